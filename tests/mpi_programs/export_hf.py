"""Run under mpirun: ``save_pretrained`` over processes writes the folder one process would.

Every rank builds the same random model split over ``comm="mpi"`` (Llama with key-value heads
replicated, Qwen2, GPT-2, BERT; ``2 * size`` workers), calls ``save_pretrained`` (rank 0 writes,
single file and sharded), then loads the folder in one process (``comm="local"``) and checks that
every weight equals the split model's bit for bit, and that the files are those of the same model
saved by one process. A folder rank 0 cannot write raises on every rank. Prints
``rank R: N checks passed`` and exits 0, or raises.

    mpirun -n 2 python tests/mpi_programs/export_hf.py FOLDER
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from tp_gpu import TensorParallelConfig, get_communicator
from tp_gpu.errors import CheckpointError
from tp_gpu.models import BertConfig, BertModel, DecoderConfig
from tp_gpu.models.decoder_loading import MODEL_CLASSES, AutoModelForCausalLM

ROTARY = dict(vocab_size=53, hidden_size=24, intermediate_size=17, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
MODELS = {
    "llama": dict(ROTARY, model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(ROTARY, model_type="qwen2", tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", vocab_size=53, n_embd=12, n_layer=2, n_head=3, n_positions=32),
}
BERT = BertConfig(vocab_size=53, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                  intermediate_size=20, max_position_embeddings=16, type_vocab_size=2)  # fmt: skip


def build(name: str, config: TensorParallelConfig):
    if name == "bert":
        model = BertModel(BERT, config, seed=1)
    else:
        model = MODEL_CLASSES[name](DecoderConfig.from_dict(MODELS[name]), config, seed=1)
    rng = np.random.default_rng(5)  # the same values on every rank
    model.load_state_dict({k: rng.standard_normal(v.shape) for k, v in model.state_dict().items()})
    return model


def load(name: str, folder: str, config: TensorParallelConfig):
    if name == "bert":
        return BertModel.from_pretrained(folder, config)
    return AutoModelForCausalLM.from_pretrained(folder, config)


def files(folder: str) -> dict:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    args = parser.parse_args()
    comm = get_communicator("mpi")
    split = TensorParallelConfig(n_workers=2 * comm.size, backend="numpy", comm="mpi")
    local = TensorParallelConfig(n_workers=1, backend="numpy", comm="local")
    checks = 0
    for name in ("llama", "qwen2", "gpt2", "bert"):
        model = build(name, split)
        state = model.state_dict()  # collective
        for shard in (None, 3000):
            kwargs = {} if shard is None else {"max_shard_size": shard}
            folder = os.path.join(args.folder, f"{name}-{shard}")
            model.save_pretrained(folder, **kwargs)  # collective; rank 0 writes
            comm.barrier()
            loaded = load(name, folder, local).state_dict()
            assert sorted(loaded) == sorted(state), name
            for key, value in state.items():
                assert np.array_equal(loaded[key], value), (name, key)
            checks += 1
            if comm.rank == 0:  # the same bytes as one process writes
                reference = os.path.join(args.folder, f"{name}-{shard}-local")
                build(name, local).save_pretrained(reference, **kwargs)
                assert files(reference) == files(folder), name
                assert len(files(folder)) > (3 if shard else 1)
            checks += 1
            comm.barrier()
    blocker = os.path.join(args.folder, "a-file")
    if comm.rank == 0:
        with open(blocker, "w") as fh:
            fh.write("x")
    comm.barrier()
    try:
        build("llama", split).save_pretrained(blocker)
    except CheckpointError as exc:  # rank 0: CheckpointFileError naming the path; others: rank 0 failed
        assert "a-file" in str(exc), exc
        checks += 1
    else:
        raise AssertionError("save_pretrained into a file did not raise")
    print(f"rank {comm.rank}: {checks} checks passed", flush=True)


if __name__ == "__main__":
    main()
