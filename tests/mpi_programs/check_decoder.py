"""Run under mpirun: a decoder split over processes equals the same decoder in one process.

Each rank builds, for worker counts that are multiples of the world size, a
Llama-shaped ``DecoderForCausalLM`` (grouped-query attention: key-value heads
split when there are enough, replicated when there are fewer than the
workers) with ``comm="mpi"``, and the same model in one process
(``comm="local"``: the reference), from the same seed. The logits, one
backward's gradient of every parameter, greedy and sampled generation of a
left-padded batch must agree (float64, rtol 1e-12; tokens exactly). Prints
``rank R: N checks passed`` and exits 0, or raises.

    mpirun -n 2 python tests/mpi_programs/check_decoder.py --backend numpy
"""

from __future__ import annotations

import argparse

import numpy as np

import tp_gpu
from tp_gpu import TensorParallelConfig, get_communicator
from tp_gpu.models import DecoderConfig, DecoderForCausalLM

TOL = dict(rtol=1e-12, atol=1e-12)


def llama(n_kv: int) -> DecoderConfig:
    return DecoderConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 97,
            "hidden_size": 24,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 6,
            "num_key_value_heads": n_kv,
            "max_position_embeddings": 64,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--devices", type=int, default=None)
    args = parser.parse_args()
    comm = get_communicator("mpi")
    rng = np.random.default_rng(7)  # the same data on every rank
    ids = rng.integers(0, 97, size=(2, 6))
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    targets = rng.integers(0, 97, size=(2, 6))
    checks = 0
    for n_kv in (6, 2):
        for workers in (comm.size, 2 * comm.size):
            models = {}
            for name in ("mpi", "local"):
                config = TensorParallelConfig(
                    n_workers=workers,
                    backend=args.backend,
                    devices=args.devices,
                    dtype="float64",
                    comm=name,
                )
                models[name] = DecoderForCausalLM(llama(n_kv), config, seed=3)
            results = {}
            for name, model in models.items():
                logits = model(ids, mask)
                loss = tp_gpu.VocabParallelCrossEntropy()(logits, targets)
                loss.backward()
                grads = {k: p.full_grad() for k, p in model.named_parameters()}
                greedy = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
                sampled = model.generate(
                    ids, mask, max_new_tokens=6, eos_token_id=[], do_sample=True, top_p=0.9, seed=1
                )
                results[name] = (logits.numpy(), float(loss), grads, greedy, sampled)
            mine, ref = results["mpi"], results["local"]
            np.testing.assert_allclose(mine[0], ref[0], **TOL)
            assert abs(mine[1] - ref[1]) <= 1e-12 * abs(ref[1])
            for key, grad in ref[2].items():
                np.testing.assert_allclose(mine[2][key], grad, **TOL, err_msg=key)
            np.testing.assert_array_equal(mine[3], ref[3])
            np.testing.assert_array_equal(mine[4], ref[4])
            replicated = models["mpi"].decoder_layers[0].attention.plan.replicated
            assert replicated == (n_kv < workers), (n_kv, workers, replicated)
            checks += 5
    print(f"rank {comm.rank}: {checks} checks passed", flush=True)


if __name__ == "__main__":
    main()
