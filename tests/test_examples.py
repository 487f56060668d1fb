"""The examples' command lines: optional libraries checked before any work, defaults shown in --help."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def train_gpt(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import train_gpt

    return train_gpt


@pytest.mark.parametrize("flags, module", [(["--torch"], "torch"), (["--plot", "x.png"], "matplotlib")])
def test_a_missing_optional_library_stops_before_training(train_gpt, monkeypatch, capsys, flags, module):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name))

    def no_training(*args, **kwargs):
        raise AssertionError("the corpus was read: the check came after the work")

    monkeypatch.setattr(train_gpt, "load_corpus", no_training)
    assert train_gpt.main([*flags, "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"train_gpt.py: error: {flags[0]} needs {module}, which is not installed: pip install {module}"
    ]


def test_every_missing_library_is_named_at_once(train_gpt, monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(train_gpt, "load_corpus", lambda: pytest.fail("trained before checking"))
    assert train_gpt.main(["--torch", "--plot", "x.png"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


@pytest.mark.parametrize(
    "script, shown",
    [
        ("train_gpt.py", ["(default: 100)", "(default: float32)", "(default: [1, 2, 4])"]),
        ("train_tiny_lm.py", ["(default: 200)", "(default: float32)", "(default: 2)"]),
        ("generate.py", ["(default: 2)", "(default: 32)", "(default: float32)", "(default: 0)"]),
    ],
)
def test_help_shows_the_defaults(script, shown):
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for default in shown:
        assert default in text, (default, text)
    assert "(default: None)" not in text and "(default: False)" not in text


def test_tiny_lm_prints_a_few_lines_into_a_log(tmp_path):
    """Into a pipe (a log), the progress is about 20 lines, not one redraw per step."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_tiny_lm.py"), "--steps", "200", "--backend", "numpy"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = (out.stdout + out.stderr).count("\n") + (out.stdout + out.stderr).count("\r")
    assert 15 <= lines <= 30, out.stdout + out.stderr


def test_generate_streams_a_tiny_llama_and_checks_it_against_transformers():
    """No folder given: it writes one, streams greedy text after the prompt, compares with transformers."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "generate.py"), "--workers", "3", "--backend", "simulated",
         "--devices", "2", "--max-new-tokens", "6", "--prompt", "A man"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "LlamaForCausalLM" in lines[0] and "3 workers" in lines[0] and lines[1].startswith("A man")
    assert len(lines[1]) > len("A man") and " tokens/s" in lines[-2]  # the text may hold a newline
    if all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
        assert lines[-1] == "transformers' greedy generate gives the same token ids: True"
    else:
        assert lines[-1].startswith("transformers check: skipped")


def test_generate_without_tokenizers_stops_before_any_work(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import generate

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tokenizers" else real(name)
    )
    monkeypatch.setattr(generate, "write_tiny_llama", lambda *a, **k: pytest.fail("wrote a folder first"))
    assert generate.main(["--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "generate.py: error: tokenizers is not installed: pip install 'tp_gpu[models]'"
    )
