"""The generation benchmark on tiny models: every side checked against transformers' generate and timed
phase by phase, the split by kind counting each layer's calls, and a side that disagrees stopping the
run before anything is written. Speed itself is not tested here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the benchmarks package lives beside tp_gpu in the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import generation, generation_profile, generation_report, harness  # noqa: E402

PROMPT, NEW = 5, 3
TINY = [
    "--quick", "--threads", "1", "--batch", "1", "3", "--prompt", str(PROMPT), "--new-tokens", str(NEW),
    "--repeat", "2", "--warmup", "1",
]  # fmt: skip
SIDES = ["tp_gpu p=1", "tp_gpu p=4", "transformers"]


@pytest.fixture(autouse=True)
def quick_harness(monkeypatch):
    """No busy loop before timing and no 50 ms of warm-up per function."""
    monkeypatch.setenv("TP_GPU_NUM_THREADS", "1")  # --threads sets it; restored after each test
    monkeypatch.setattr(harness, "warm_up_machine", lambda: None)
    monkeypatch.setattr(harness, "MIN_WARMUP_S", 0.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("generation")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "warm_up_machine", lambda: None)
        mp.setattr(harness, "MIN_WARMUP_S", 0.0)
        assert generation.main(TINY + ["--out", str(out)]) == 0
    (path,) = out.glob("generation-*-quick.json")
    return path, json.loads(path.read_text())


def test_every_side_is_checked_then_timed_phase_by_phase(tiny_run):
    _, data = tiny_run
    assert data["machine"]["complete"] is True and data["machine"]["transformers"]
    records = data["results"]
    assert [(r["model"], r["batch"]) for r in records] == [
        (m, b) for m in ("llama-tiny", "gpt2-tiny") for b in (1, 3)
    ]
    for r in records:
        assert r["check"]["tokens_equal"] and r["check"]["tokens_checked"] == r["batch"] * (1 + NEW)
        assert list(r["sides"]) == SIDES
        for side in r["sides"].values():
            times, phases = side["times_s"], side["phases_s"]
            assert len(times) == 2 and set(phases) == {"prefill", "decode"}
            for i, total in enumerate(times):  # the laps lie inside the timed run
                parts = phases["prefill"][i] + phases["decode"][i]
                assert 0 < phases["prefill"][i] and 0 < phases["decode"][i] and parts <= total * 1.0001


def test_the_targets_cover_the_issues_rows(tiny_run):
    _, data = tiny_run
    cases = [(t["target"], t["case"]) for t in data["targets"]]
    expected = []
    for model in ("llama-tiny", "gpt2-tiny"):
        for row in (f"prefill {PROMPT} @B=1", f"decode {NEW} @B=1", f"decode {NEW} @B=3"):
            expected += [
                ("p=1 time per token <= transformers'", f"{model} {row}"),
                ("p>1 time per token <= 1.1x p=1", f"{model} {row}"),
            ]
    assert cases == expected
    for t in data["targets"]:
        assert t["status"] in ("met", "missed", "noisy") and t["worst"] > 0


@pytest.mark.parametrize(
    "model, ours_calls, torch_calls",
    [
        # llama-tiny, 2 layers, 2 key-value heads (split at p=1, replicated at p=4): q, k, v, gate-up and the
        # head column-parallel, o and down row-parallel; 7 nn.Linear a layer and the head.
        ("llama-tiny", {"ColumnLinear": 9, "RowLinear": 4, "GroupedAttention": 2, "RMSNormFunction": 5},
         {"Linear": 15, "LlamaAttention": 2, "LlamaRMSNorm": 5}),
        # gpt2-tiny: q, k, v and fc1 column-parallel, its head tied; four Conv1D a layer, the head a Linear.
        ("gpt2-tiny", {"ColumnLinear": 8, "RowLinear": 4, "TiedLogits": 1, "LayerNormFunction": 5},
         {"Conv1D": 8, "Linear": 1, "GPT2Attention": 2, "LayerNorm": 5}),
    ],
)  # fmt: skip
def test_the_split_by_kind_counts_each_layers_calls_per_step(tiny_run, model, ours_calls, torch_calls):
    _, data = tiny_run
    for r in (r for r in data["results"] if r["model"] == model):
        for name, b in r["breakdown"].items():
            decode = b["phases"]["decode"]
            expected = torch_calls if name == "transformers" else ours_calls
            calls = {k: v for k, v in decode["calls"].items() if k in expected}
            if name == "tp_gpu p=4" and model == "llama-tiny":  # k and v replicated: 2 kv heads, 4 workers
                expected = dict(expected, ColumnLinear=5, ReplicatedLinearFunction=4)
                calls["ReplicatedLinearFunction"] = decode["calls"].get("ReplicatedLinearFunction")
            assert calls == {k: v * NEW for k, v in expected.items()}, (name, r["batch"])
            kinds = decode["kinds_s"]
            assert list(kinds) == list(generation_profile.KINDS)
            assert sum(kinds.values()) == pytest.approx(decode["seconds"], rel=1e-3)  # other: the rest
            assert all(kinds[k] > 0 for k in ("GEMMs", "attention", "norms"))
        ops = r["breakdown"]["transformers"]["decode_ops"]
        assert 0 < ops["ops_self_s"] and ops["top"] and all(op["calls"] > 0 for op in ops["top"])


def test_the_markdown_has_every_table_and_render_redraws_it(tiny_run, tmp_path):
    path, data = tiny_run
    markdown = path.with_suffix(".md").read_text()
    for heading in ("## Speed targets", "## Tokens per second", "### Decode, µs per token", "### By class",
                    "### transformers' decoding operators"):  # fmt: skip
        assert heading in markdown
    assert f"| gpt2-tiny prefill {PROMPT} @B=3 (not a target) |" in markdown
    assert "| llama-tiny | 3 | tp_gpu p=4 |" in markdown
    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    assert generation.main(["--render", str(copy)]) == 0
    assert copy.with_suffix(".md").read_text() == markdown


def test_a_side_that_disagrees_with_transformers_stops_the_run(tmp_path, monkeypatch):
    """transformers' head negated after tp_gpu loaded the saved folder: tp_gpu's greedy tokens are no
    longer transformers'; the run stops before timing and writes nothing."""
    real = generation.load_models

    def wrong(name, workers, torch):
        reference, models, parameters = real(name, workers, torch)
        with torch.no_grad():
            reference.lm_head.weight.neg_()
        return reference, models, parameters

    monkeypatch.setattr(generation, "load_models", wrong)
    argv = TINY + ["--models", "llama-tiny", "--no-profile", "--out", str(tmp_path)]
    with pytest.raises(generation.GenerationMismatch, match=r"llama-tiny B=1: tp_gpu p=1's greedy tokens"):
        generation.main(argv)
    assert not list(tmp_path.iterdir())


def test_the_check_compares_every_side_with_generate(monkeypatch):
    """The loop the transformers side times is itself checked against generate's tokens."""
    torch = pytest.importorskip("torch")
    reference, models, _ = generation.load_models("gpt2-tiny", [1], torch)
    ids = generation.prompt(512, 2, 4)
    sides = {
        "tp_gpu p=1": generation.OursSide(models[1], ids, 2),
        "transformers": generation.TorchSide(reference, ids, 2, torch),
    }
    assert generation.check_sides(sides, "x")["tokens_checked"] == 6
    monkeypatch.setattr(generation.TorchSide, "generate", lambda self: np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(generation.GenerationMismatch, match=r"x: tp_gpu p=1's greedy tokens differ"):
        generation.check_sides(sides, "x")


def test_the_program_starts():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.generation", "--help"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and "--render" in done.stdout and "--new-tokens" in done.stdout, done.stderr
    assert generation_report.ours(4) == "tp_gpu p=4"
