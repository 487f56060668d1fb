"""SentenceEncoder on folders that sentence-transformers 2.x to 6.x write.

The folders in ``tests/data/st_folders`` were written by sentence-transformers
6.3 itself around a tiny random BERT (``make_st_folders.py``; one rewritten in
the 2.2 format), with its float32 and float64 embeddings of 13 sentences (five
longer than the folders' limit). Every accuracy test compares with those
committed references; the tests marked "live" compare the references, tokens,
limits, dimensions and similarities with the installed sentence-transformers
and skip without it (CI). Tolerances: float32 max abs <= 2e-5, float64 <= 1e-9.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pytest

from tp_gpu import ConfigError, ShapeError, TensorParallelConfig, TensorParallelError
from tp_gpu.errors import CheckpointError
from tp_gpu.models import BertModel, SentenceEncoder
from tp_gpu.models.torch_bin import read_torch_bin

pytest.importorskip("tokenizers")

DATA = Path(__file__).resolve().parent / "data" / "st_folders"
META = json.loads((DATA / "reference.json").read_text(encoding="utf-8"))
REFERENCE = dict(np.load(DATA / "reference.npz"))
SENTENCES: List[str] = META["sentences"]
BATCH = META["batch_size"]
MAIN = "v6_mean_dense_normalize"
FOLDERS = list(META["folders_sha256"])
CALLS = list(META["calls"])  # "folder/call"
ATOL = {"float32": 2e-5, "float64": 1e-9}
SIMULATED = ("simulated", 3)
NUMPY = ("numpy", None)

_cache: Dict[Any, SentenceEncoder] = {}


def encoder(folder: Any, n_workers: int = 1, dtype: str = "float64", backend=NUMPY) -> SentenceEncoder:
    """The encoder of ``folder`` (a name in st_folders, or a path), cached per configuration."""
    key = (str(folder), n_workers, dtype, backend)
    if key not in _cache:
        config = TensorParallelConfig(
            n_workers=n_workers, backend=backend[0], devices=backend[1], dtype=dtype
        )
        path = DATA / folder if isinstance(folder, str) else folder
        _cache[key] = SentenceEncoder.from_pretrained(path, config)
    return _cache[key]


def check(call: str, dtype: str, n_workers: int, backend=NUMPY) -> float:
    folder, name = call.split("/")
    got = encoder(folder, n_workers, dtype, backend).encode(
        SENTENCES, batch_size=BATCH, **META["calls"][call]
    )
    expected = REFERENCE[f"{call}/{dtype}"]
    assert got.dtype == np.dtype(dtype) and got.shape == expected.shape
    error = float(np.abs(got.astype(np.float64) - expected).max())
    assert error <= ATOL[dtype], (
        f"{call} {dtype} p={n_workers} {backend}: max abs {error:.3g} > {ATOL[dtype]}"
    )
    return error


# --- accuracy against the committed references ------------------------------------------------------------


@pytest.mark.parametrize("backend", [NUMPY, SIMULATED], ids=["numpy", "sim3"])
@pytest.mark.parametrize("n_workers", range(1, 9))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_main_folder_every_worker_count(dtype, n_workers, backend):
    """Mean pooling, Dense(18 -> 11, bias, Tanh), Normalize: 3 heads and 23 MLP columns over 1..8 workers."""
    check(f"{MAIN}/default", dtype, n_workers, backend)


#: Worker counts per folder beyond the main one: uneven splits (5, 7 of 3 heads), more workers than devices.
SUBSETS = [(2, NUMPY), (7, NUMPY), (4, SIMULATED)]


@pytest.mark.parametrize("n_workers, backend", SUBSETS, ids=["numpy2", "numpy7", "sim3x4"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("call", [c for c in CALLS if not c.startswith(MAIN)])
def test_every_folder_and_call(call, dtype, n_workers, backend):
    check(call, dtype, n_workers, backend)


def test_token_embeddings_equal_the_reference():
    counts = REFERENCE[f"{MAIN}/token_counts"]
    expected = np.split(REFERENCE[f"{MAIN}/token_embeddings/float32"], np.cumsum(counts)[:-1])
    got = encoder(MAIN, 3, "float32").encode(SENTENCES, batch_size=BATCH, output_value="token_embeddings")
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert max(float(np.abs(g - e).max()) for g, e in zip(got, expected)) <= 2e-5
    single = encoder(MAIN, 3, "float32").encode(SENTENCES[1], output_value="token_embeddings")
    np.testing.assert_allclose(single, got[1], rtol=0, atol=1e-6)


# --- settings read from each format ------------------------------------------------------------------


def test_sequence_limits_and_truncation():
    assert encoder(MAIN).max_seq_length == 24  # tokenizer_config.json 24 (v6), = the position table
    assert encoder("v6_lasttoken_short").max_seq_length == 10  # shorter than the 24 positions
    assert encoder("v2_format").max_seq_length == 16  # sentence_bert_config.json, not tokenizer_config's 512
    ids, mask, _ = encoder("v6_lasttoken_short").tokenize(SENTENCES)
    assert ids.shape[1] == 10 and (mask.sum(axis=1) == 10).sum() >= 5  # long sentences are cut
    assert (ids[mask.sum(axis=1) == 10, 9] == 3).all()  # [SEP] (id 3) kept last


def copy_folder(tmp_path: Path, name: str = MAIN) -> Path:
    return Path(shutil.copytree(DATA / name, tmp_path / name))


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    value = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(change(value)), encoding="utf-8")


def drop(key: str) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    return lambda d: {k: v for k, v in d.items() if k != key}


def put(**items: Any) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    return lambda d: {**d, **items}


@pytest.mark.parametrize(
    "settings, tokenizer, expected",
    [
        (None, drop("model_max_length"), 24),  # nothing said: the position table
        (None, put(model_max_length=7), 7),
        (None, put(model_max_length=10**30), 24),  # transformers' "no limit"
        ({"max_seq_length": 9}, put(model_max_length=7), 9),  # the 2.x setting wins
        ({"max_seq_length": 500}, None, 24),  # capped by the 24 positions
        ({"max_seq_length": 9, "tokenizer_args": {"model_max_length": 5}}, None, 5),
        ({"processor_kwargs": {"model_max_length": 6}}, None, 6),
    ],
)
def test_sequence_limit_wherever_each_version_keeps_it(tmp_path, settings, tokenizer, expected):
    folder = copy_folder(tmp_path)
    if settings is not None:
        edit_json(folder / "sentence_bert_config.json", put(**settings))
    if tokenizer is not None:
        edit_json(folder / "tokenizer_config.json", tokenizer)
    ours = encoder(folder)
    assert ours.max_seq_length == expected
    if expected < 24:
        assert ours.tokenize(SENTENCES)[0].shape[1] == expected
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    live = SentenceTransformer(str(folder), device="cpu")
    assert min(live.max_seq_length, 24) == expected  # live: sentence-transformers does not cap 500


def test_do_lower_case_of_old_folders():
    """v2_format's tokenizer is cased; sentence_bert_config.json's do_lower_case lower-cases first."""
    ids, _, _ = encoder("v2_format").tokenize(["Hello World THE DOG", "hello world the dog"])
    np.testing.assert_array_equal(ids[0], ids[1])
    assert encoder("v2_format").settings.do_lower_case and not encoder(MAIN).settings.do_lower_case


def test_pooling_settings_in_both_formats():
    assert encoder("v2_format").settings.pooling.modes == ("cls", "mean")  # old flags, their order
    assert encoder("v6_multi").settings.pooling.modes == ("max", "cls", "weightedmean", "mean")  # as listed
    assert not encoder("v6_prompts").settings.pooling.include_prompt
    dims = {name: encoder(name).get_sentence_embedding_dimension() for name in FOLDERS}
    assert dims == {name: REFERENCE[f"{name}/default/float64"].shape[1] for name in FOLDERS}


def test_similarity_function_from_the_folder():
    names = {name: encoder(name).similarity_fn_name for name in FOLDERS}
    assert names.pop("v6_mean_sqrt_len_tokens") == "dot" and names.pop("v6_multi") == "euclidean"
    assert set(names.values()) == {"cosine"}
    a, b = REFERENCE[f"{MAIN}/default/float64"][:4], REFERENCE[f"{MAIN}/default/float64"][4:]
    cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    np.testing.assert_allclose(encoder(MAIN).similarity(a, b), cos, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        encoder("v6_mean_sqrt_len_tokens").similarity(a, b), a @ b.T, rtol=0, atol=1e-12
    )
    distance = np.array([[np.linalg.norm(x - y) for y in b] for x in a])
    np.testing.assert_allclose(encoder("v6_multi").similarity(a, b), -distance, rtol=0, atol=1e-12)
    assert encoder(MAIN).similarity(a[0], list(b)).shape == (1, len(b))
    with pytest.raises(ShapeError, match=r"embeddings2 has 3 columns; expected 11"):
        encoder(MAIN).similarity(a, b[:, :3])


# --- encode's keywords ---------------------------------------------------------------------------------


def test_encode_keywords_and_empty_input():
    model = encoder(MAIN, 2, "float64")
    full = model.encode(SENTENCES, batch_size=BATCH)
    assert model.encode([]).shape == (0,) and model.encode([], convert_to_numpy=False) == []
    assert model.encode([], output_value="token_embeddings") == []
    rows = model.encode(SENTENCES, batch_size=BATCH, convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == len(SENTENCES)
    np.testing.assert_allclose(np.stack(rows), full, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.encode(SENTENCES[3]), full[3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.encode(SENTENCES, normalize_embeddings=True), full, rtol=0, atol=1e-12)
    raw = encoder("v6_cls", 2).encode(SENTENCES, batch_size=BATCH)
    unit = encoder("v6_cls", 2).encode(SENTENCES, batch_size=BATCH, normalize_embeddings=True)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=0, atol=1e-12)


def test_prompts_default_and_explicit():
    model = encoder("v6_prompts")
    calls = META["calls"]
    default = model.encode(SENTENCES, batch_size=BATCH)
    np.testing.assert_allclose(
        model.encode(SENTENCES, batch_size=BATCH, prompt="query: "), default, rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(
        model.encode(SENTENCES, batch_size=BATCH, prompt_name="query"), default, rtol=0, atol=1e-12
    )
    explicit = model.encode(SENTENCES, batch_size=BATCH, prompt="search for: ", prompt_name="passage")
    np.testing.assert_allclose(explicit, REFERENCE["v6_prompts/explicit/float64"], rtol=0, atol=1e-9)
    assert calls["v6_prompts/empty"] == {"prompt_name": "empty"}
    assert not np.allclose(REFERENCE["v6_prompts/empty/float64"], default)  # the default prompt mattered


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"prompt_name": "nope"},
            ConfigError,
            r"prompt_name 'nope' is not one of the folder's prompts \['document', 'empty', 'passage', 'qu",
        ),
        ({"prompt": 3}, ShapeError, r"prompt must be a str or None, got int"),
        (
            {"prompt": "bad \ud800"},
            ShapeError,
            r"prompt is not valid Unicode: lone surrogate '\\ud800' at character 4",
        ),
        ({"output_value": None}, ConfigError, r"output_value must be one of .*, got None"),
        ({"output_value": "tokens"}, ConfigError, r"output_value must be one of .*, got 'tokens'"),
        ({"batch_size": 0}, ConfigError, r"batch_size must be a positive integer"),
    ],
)
def test_bad_encode_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        encoder("v6_prompts").encode(["fine"], **kwargs)


class _NoWork:
    """A tokenizer that fails the test if called: the checks must come first."""

    def encode_batch(self, *args: Any) -> Any:
        raise AssertionError("tokenised before the checks")

    encode = encode_batch


def test_lone_surrogate_is_a_shape_error_before_any_work():
    model = encoder(MAIN)
    stub = SentenceEncoder.__new__(SentenceEncoder)
    stub.__dict__.update(model.__dict__)
    object.__setattr__(stub, "tokenizer", _NoWork())
    for bad, index in ((["\ud800"], 0), (["ok", "fine", "x\udfffy"], 2)):
        with pytest.raises(ShapeError, match=rf"sentences\[{index}\] is not valid Unicode: lone surrogate"):
            stub.encode(bad)
    with pytest.raises(ShapeError, match=r"sentences\[0\] is not valid Unicode"):
        stub.encode("\ud800")


# --- folders this does not compute: named errors, before any weight is read ----------------------------


def pooling_json(folder: Path) -> Path:
    return folder / "1_Pooling" / "config.json"


def dense_json(folder: Path) -> Path:
    return folder / "2_Dense" / "config.json"


def set_module_type(index: int, kind: str) -> Callable[[List[Dict[str, Any]]], List[Dict[str, Any]]]:
    return lambda modules: [{**m, "type": kind} if i == index else m for i, m in enumerate(modules)]


BAD_FOLDERS = [
    ("modules.json", set_module_type(2, "sentence_transformers.models.LSTM"), ConfigError,
     r"modules\.json: module 2 has unsupported type 'sentence_transformers\.models\.LSTM'"),
    ("modules.json", set_module_type(1, "my_package.Pooling"), ConfigError,
     r"modules\.json: module 1 has unsupported type 'my_package\.Pooling'"),
    ("modules.json", lambda m: [m[1], m[0], *m[2:]], ConfigError,
     r"modules must be Transformer, Pooling, Dense\*, Normalize\?; got \['Pooling', 'Transformer'"),
    ("modules.json", lambda m: {"modules": m}, ConfigError,
     r"modules\.json: expected a JSON list of modules, got dict"),
    (pooling_json, put(pooling_mode="median"), ConfigError,
     r"1_Pooling/config\.json: unknown pooling mode 'median'; expected one of \['cls'"),
    (pooling_json, put(pooling_mode=["mean", "last"]), ConfigError, r"unknown pooling mode 'last'"),
    (pooling_json, put(pooling_mode=3), ConfigError,
     r"pooling_mode must be a mode name or a non-empty list of them, got 3"),
    (pooling_json, put(pooling_mode=[]), ConfigError, r"pooling_mode must be .*, got \[\]"),
    (pooling_json, lambda d: {"embedding_dimension": 18, "pooling_mode_median_tokens": True}, ConfigError,
     r"1_Pooling/config\.json: unknown pooling flag 'pooling_mode_median_tokens'"),
    (pooling_json, lambda d: {"word_embedding_dimension": 18, "pooling_mode_cls_token": "yes"}, ConfigError,
     r"pooling_mode_cls_token must be true or false, got 'yes'"),
    (pooling_json, put(embedding_dimension=0), ConfigError,
     r"embedding_dimension must be a positive integer, got 0"),
    (pooling_json, put(include_prompt="no"), ConfigError, r"include_prompt must be true or false, got 'no'"),
    (dense_json, put(activation_function="torch.nn.modules.activation.Softmax"), ConfigError,
     r"2_Dense/config\.json: unsupported activation_function 'torch\.nn\.modules\.activation\.Softmax'"),
    (dense_json, put(activation_function="my_package.Swish"), ConfigError,
     r"unsupported activation_function 'my_package\.Swish'; expected one of \['torch\.nn\.Identity'"),
    (dense_json, put(in_features=17), ConfigError, r"2_Dense/config\.json: in_features is 17; expected 18"),
    (dense_json, put(out_features=12), CheckpointError,
     r"2_Dense/model\.safetensors: tensor 'linear\.weight' has shape \(11, 18\); expected \(12, 18\)"),
    (dense_json, put(bias="yes"), ConfigError, r"bias must be true or false, got 'yes'"),
    (dense_json, put(module_input_name="token_embeddings"), ConfigError,
     r"module_input_name must be 'sentence_embedding', got 'token_embeddings'"),
    ("sentence_bert_config.json", put(max_seq_length=0), ConfigError,
     r"sentence_bert_config\.json: max_seq_length must be a positive integer, got 0"),
    ("sentence_bert_config.json", put(transformer_task="text-generation"), ConfigError,
     r"transformer_task must be 'feature-extraction', got 'text-generation'"),
    ("sentence_bert_config.json", put(processing_kwargs={"text": {"max_length": 5}}), ConfigError,
     r"sentence_bert_config\.json: processing_kwargs=.* is not supported"),
    ("tokenizer_config.json", put(padding_side="middle"), ConfigError,
     r"tokenizer_config\.json: padding_side must be 'left' or 'right', got 'middle'"),
    ("config_sentence_transformers.json", put(default_prompt_name="nope"), ConfigError,
     r"config_sentence_transformers\.json: default_prompt_name 'nope' is not one of the prompts"),
    ("config_sentence_transformers.json", put(similarity_fn_name="maxsim"), ConfigError,
     r"similarity_fn_name must be one of \['cosine', 'dot', 'euclidean', 'manhattan'\], got 'maxsim'"),
    ("config_sentence_transformers.json", put(prompts={"query": 3}), ConfigError,
     r"prompts must map names to strings"),
]  # fmt: skip


@pytest.mark.parametrize("target, change, error, message", BAD_FOLDERS)
def test_bad_folders_are_named_before_any_weight_is_read(
    tmp_path, monkeypatch, target, change, error, message
):
    folder = copy_folder(tmp_path)
    edit_json(target(folder) if callable(target) else folder / target, change)

    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("BertModel.from_pretrained ran before the checks")

    monkeypatch.setattr(BertModel, "from_pretrained", no_loading)
    with pytest.raises(error, match=message):
        SentenceEncoder.from_pretrained(folder)


def test_pooling_width_must_be_the_hidden_size(tmp_path):
    folder = copy_folder(tmp_path, "v6_max")  # no Dense after the pooling
    edit_json(pooling_json(folder), put(embedding_dimension=20))
    with pytest.raises(
        ConfigError, match=r"the pooling's embedding_dimension is 20; expected the model's hidden_size 18"
    ):
        SentenceEncoder.from_pretrained(folder)


def test_missing_and_foreign_weight_files(tmp_path):
    folder = copy_folder(tmp_path)
    (folder / "2_Dense" / "model.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"2_Dense: no model\.safetensors nor pytorch_model\.bin; found"
    ):
        SentenceEncoder.from_pretrained(folder)
    (folder / "2_Dense" / "pytorch_model.bin").write_bytes(b"not a zip archive")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is not a zip-format torch\.save file"):
        SentenceEncoder.from_pretrained(folder)
    (folder / "2_Dense" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"2_Dense/config\.json is missing"):
        SentenceEncoder.from_pretrained(folder)


def test_hub_ids_say_how_to_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hint = (
        r"does not exist; 'sentence-transformers/all-MiniLM-L6-v2' looks like a Hugging Face Hub id.*"
        r"`huggingface-cli download sentence-transformers/all-MiniLM-L6-v2 --local-dir all-MiniLM-L6-v2`"
        r".*`hf download .*and pass that folder \('all-MiniLM-L6-v2'\)"
    )
    with pytest.raises(CheckpointError, match=hint):
        SentenceEncoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(
        CheckpointError, match=r"BertModel\.from_pretrained: .*`huggingface-cli download bert/tiny"
    ):
        BertModel.from_pretrained("bert/tiny")
    for path in ("no/such/folder", "/abs/name", "./a/b", "plain"):
        with pytest.raises(CheckpointError, match="does not exist") as info:
            SentenceEncoder.from_pretrained(path)
        assert "Hub" not in str(info.value), path
    shutil.copytree(DATA / "v6_cls", tmp_path / "owner" / "name")  # an existing owner/name is a folder
    assert SentenceEncoder.from_pretrained("owner/name").embedding_dim == 7


# --- live sentence-transformers ---------------------------------------------------------------------------


def live_model(path: Any, dtype: str = "float32") -> Any:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    return model.to(torch.float64) if dtype == "float64" else model


@pytest.mark.parametrize("folder", FOLDERS)
def test_committed_references_equal_live_sentence_transformers(folder):
    pytest.importorskip("sentence_transformers")
    for call in (c for c in CALLS if c.startswith(f"{folder}/")):
        for dtype in ("float32", "float64"):
            live = live_model(DATA / folder, dtype).encode(SENTENCES, batch_size=BATCH, **META["calls"][call])
            np.testing.assert_allclose(live, REFERENCE[f"{call}/{dtype}"], rtol=0, atol=1e-6, err_msg=call)
    model = live_model(DATA / folder)
    features = model.tokenize(SENTENCES)
    ids, mask, _ = encoder(folder).tokenize(SENTENCES)
    np.testing.assert_array_equal(ids, features["input_ids"].numpy())
    np.testing.assert_array_equal(mask, features["attention_mask"].numpy())
    assert encoder(folder).get_sentence_embedding_dimension() == model.get_embedding_dimension()
    assert encoder(folder).similarity_fn_name == model.similarity_fn_name
    emb = REFERENCE[f"{folder}/default/float64"]
    np.testing.assert_allclose(
        encoder(folder).similarity(emb[:5], emb), model.similarity(emb[:5], emb).numpy(), atol=1e-9
    )


@pytest.mark.parametrize("folder", ["v6_multi", "v6_lasttoken_short", "v6_prompts"])
def test_left_padding_equals_live_sentence_transformers(tmp_path, folder):
    """padding_side='left' (tokenizer_config.json): cls, max, weightedmean, mean, lasttoken, prompts."""
    pytest.importorskip("sentence_transformers")
    path = copy_folder(tmp_path, folder)
    edit_json(path / "tokenizer_config.json", put(padding_side="left"))
    ours = encoder(path, 3, "float64").encode(SENTENCES, batch_size=BATCH)
    live = live_model(path, "float64").encode(SENTENCES, batch_size=BATCH)
    assert not np.allclose(live, REFERENCE[f"{folder}/default/float64"])  # the padding side mattered
    np.testing.assert_allclose(ours, live, rtol=0, atol=1e-9)


def test_pytorch_model_bin_equals_torch_load():
    torch = pytest.importorskip("torch")
    path = DATA / "v2_format" / "2_Dense" / "pytorch_model.bin"
    expected = torch.load(path, weights_only=True)
    got = read_torch_bin(str(path))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(got[name], tensor.numpy())


def test_folders_are_the_committed_ones():
    """The references belong to these files: a changed folder must be regenerated with make_st_folders.py."""
    import hashlib

    for name, digest in META["folders_sha256"].items():
        h = hashlib.sha256()
        for file in sorted(p for p in (DATA / name).rglob("*") if p.is_file()):
            h.update(str(file.relative_to(DATA / name)).encode())
            h.update(file.read_bytes())
        assert h.hexdigest() == digest, f"{name} changed: rerun tests/data/make_st_folders.py"


def test_errors_are_tensor_parallel_errors():
    assert issubclass(ConfigError, TensorParallelError) and issubclass(CheckpointError, TensorParallelError)
