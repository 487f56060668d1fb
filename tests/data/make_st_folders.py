"""Write tests/data/st_folders/: tiny sentence-transformers folders and their reference embeddings.

Run from the repository root, with torch, transformers, tokenizers and
sentence-transformers installed (``python tests/data/make_st_folders.py``).

Every folder is written by sentence-transformers itself,
``SentenceTransformer(modules=[Transformer, Pooling, Dense*, Normalize?]).save(path)``,
around one small randomly initialised BERT (transformers ``BertModel``: 2
layers, hidden 18 in 3 heads of 6, MLP 23, 24 positions; seeded) and a
WordPiece tokenizer trained with ``tokenizers`` on a few sentences (about
100 tokens), so that all folders together stay near 300 KB. The ``README.md``
model card each save writes is deleted (it is only text, and the largest file).

``v2_format`` is the one folder in the format of sentence-transformers 2.x:
it is saved by 6.x and then rewritten as 2.2 wrote it: ``modules.json`` types
``sentence_transformers.models.*``, the ``pooling_mode_*_tokens`` flags and
``word_embedding_dimension`` in ``1_Pooling/config.json``, ``max_seq_length``
and ``do_lower_case`` in ``sentence_bert_config.json`` (with a cased
tokenizer, so lower-casing matters, and ``tokenizer_config.json`` saying 512
tokens, so the limit must come from ``sentence_bert_config.json``), the Dense
weights in ``pytorch_model.bin`` (``torch.save`` of its state dict) and a
``config_sentence_transformers.json`` with only ``__version__``.

The references are sentence-transformers' own ``encode`` of ``SENTENCES``
after loading each saved folder back (``SentenceTransformer(path)``): float32
and, after ``model.double()``, float64, in batches of ``BATCH_SIZE``; the
prompt folder also with ``prompt_name`` and ``prompt``, and the main folder's
token embeddings. They go to ``reference.npz``; ``reference.json`` records
the versions of sentence-transformers, transformers and torch, the sentences
and the calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "st_folders"
BATCH_SIZE = 4

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "",
    "Hello World",
    "THE LAZY DOG SLEEPS ALL DAY LONG, AND THE QUICK FOX RUNS AROUND THE DOG AGAIN AND AGAIN AND AGAIN.",
    "a",
    "Café crème brûlée is a dessert.",
    "the dog runs and the fox runs and the man eats and the cat sleeps and everyone is happy today",
    "What is the capital of France?",
    "Numbers like 12345 and 3.14 appear here.",
    "emoji 🙂 and 中文 and Ελληνικά",
    "fox",
    "a man, a plan, a canal: panama. a man, a plan, a canal: panama. a man, a plan.",
]

TRAIN_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a man is eating food and the dog sleeps",
    "hello world, this is a tiny tokenizer for tests",
    "what is the capital of france? paris is.",
    "numbers 0 1 2 3 4 5 6 7 8 9 and a plan",
    "query: passage: search for the answer",
]

# name, pooling_mode, dense [(out, bias, activation)], normalize, and SentenceTransformer/Pooling extras
FOLDERS: List[Dict[str, Any]] = [
    {"name": "v6_mean_dense_normalize", "pooling": "mean", "dense": [(11, True, "Tanh")], "normalize": True},
    {"name": "v6_cls", "pooling": "cls", "dense": [(7, False, "Identity")], "normalize": False},
    {"name": "v6_max", "pooling": "max", "dense": [], "normalize": True},
    {
        "name": "v6_mean_sqrt_len_tokens",
        "pooling": "mean_sqrt_len_tokens",
        "dense": [(13, True, "GELU"), (5, False, "ReLU")],
        "normalize": False,
        "similarity": "dot",
    },
    {
        "name": "v6_weightedmean",
        "pooling": "weightedmean",
        "dense": [(9, True, "Sigmoid")],
        "normalize": False,
    },
    {"name": "v6_lasttoken_short", "pooling": "lasttoken", "dense": [], "normalize": False, "limit": 10},
    {
        "name": "v6_multi",
        "pooling": ["max", "cls", "weightedmean", "mean"],
        "dense": [(8, True, "SiLU")],
        "normalize": True,
        "similarity": "euclidean",
    },
    {
        "name": "v6_prompts",
        "pooling": "mean",
        "dense": [],
        "normalize": False,
        "include_prompt": False,
        "prompts": {"query": "query: ", "passage": "passage: ", "empty": ""},
        "default_prompt_name": "query",
    },
    {"name": "v2_format", "pooling": ["cls", "mean"], "dense": [(10, True, "Tanh")], "normalize": True},
]

#: Extra encode calls per folder (besides the default one): key -> keyword arguments.
EXTRA_CALLS = {
    "v6_prompts": {
        "passage": {"prompt_name": "passage"},
        "explicit": {"prompt": "search for: "},
        "empty": {"prompt_name": "empty"},
    },
}


def train_tokenizer(tmp: Path) -> Path:
    """A BERT WordPiece tokenizer (lower-casing) saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        TRAIN_TEXT * 4, trainers.WordPieceTrainer(vocab_size=100, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    path = tmp / "tokenizer"
    BertTokenizerFast(tokenizer_object=tok, model_max_length=512, do_lower_case=True).save_pretrained(path)
    return path


def make_bert(tmp: Path, tokenizer_dir: Path) -> Path:
    """A seeded random 2-layer BERT with the tokenizer, as a Hugging Face folder."""
    import torch
    from transformers import BertConfig, BertModel

    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=18, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=23, max_position_embeddings=24, initializer_range=0.3,
    )  # fmt: skip
    torch.manual_seed(20)
    path = tmp / "bert"
    BertModel(config).save_pretrained(path)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


def build(spec: Dict[str, Any], bert_dir: Path, seed: int) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(seed)
    transformer = models.Transformer(str(bert_dir))
    if "limit" in spec:
        transformer.max_seq_length = spec["limit"]  # v6 keeps it as tokenizer_config.json's model_max_length
    hidden = transformer.get_embedding_dimension()
    pooling = models.Pooling(hidden, spec["pooling"], include_prompt=spec.get("include_prompt", True))
    modules = [transformer, pooling]
    width = pooling.get_embedding_dimension()
    for out, bias, activation in spec["dense"]:
        modules.append(
            models.Dense(width, out, bias=bias, activation_function=getattr(torch.nn, activation)())
        )
        width = out
    if spec["normalize"]:
        modules.append(models.Normalize())
    model = SentenceTransformer(
        modules=modules,
        device="cpu",
        prompts=spec.get("prompts"),
        default_prompt_name=spec.get("default_prompt_name"),
        similarity_fn_name=spec.get("similarity"),
    )
    path = OUT / spec["name"]
    shutil.rmtree(path, ignore_errors=True)
    model.save(str(path))
    (path / "README.md").unlink(missing_ok=True)
    return path


def rewrite_as_v2(path: Path) -> None:
    """Rewrite a 6.x folder (cls + mean, one Dense, Normalize) as sentence-transformers 2.2 wrote it."""
    import torch
    from safetensors.torch import load_file

    types = ["Transformer", "Pooling", "Dense", "Normalize"]
    modules = json.loads((path / "modules.json").read_text())
    for module, kind in zip(modules, types):
        module["type"] = f"sentence_transformers.models.{kind}"
    write_json(path / "modules.json", modules)
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    write_json(
        path / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": pooling["embedding_dimension"],
            "pooling_mode_cls_token": True,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    write_json(path / "sentence_bert_config.json", {"max_seq_length": 16, "do_lower_case": True})
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config.update(model_max_length=512, do_lower_case=False)
    write_json(path / "tokenizer_config.json", tokenizer_config)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False  # cased: only do_lower_case lower-cases
    write_json(path / "tokenizer.json", tokenizer)
    dense = path / "2_Dense"
    config = json.loads((dense / "config.json").read_text())
    keys = ("in_features", "out_features", "bias", "activation_function")
    write_json(dense / "config.json", {k: config[k] for k in keys})
    state = load_file(str(dense / "model.safetensors"))
    torch.save(state, dense / "pytorch_model.bin")
    (dense / "model.safetensors").unlink()
    (path / "3_Normalize" / "config.json").unlink(missing_ok=True)
    write_json(
        path / "config_sentence_transformers.json",
        {"__version__": {"sentence_transformers": "2.2.2", "transformers": "4.30.2", "pytorch": "2.0.1"}},
    )


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def encode(path: Path, dtype: str, **kwargs: Any) -> np.ndarray:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    if dtype == "float64":
        model.to(torch.float64)
    return model.encode(SENTENCES, batch_size=BATCH_SIZE, convert_to_numpy=True, **kwargs)


def token_embeddings(path: Path) -> List[np.ndarray]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    rows = model.encode(SENTENCES, batch_size=BATCH_SIZE, output_value="token_embeddings")
    return [r.numpy() for r in rows]


def sha256_of_folder(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def main(tmp_root: Optional[str] = None) -> None:
    import tempfile

    import sentence_transformers
    import torch
    import transformers

    OUT.mkdir(exist_ok=True)
    arrays: Dict[str, np.ndarray] = {}
    calls: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        bert_dir = make_bert(Path(tmp), train_tokenizer(Path(tmp)))
        for seed, spec in enumerate(FOLDERS):
            path = build(spec, bert_dir, seed)
            if spec["name"] == "v2_format":
                rewrite_as_v2(path)
            for call, kwargs in {"default": {}, **EXTRA_CALLS.get(spec["name"], {})}.items():
                for dtype in ("float32", "float64"):
                    arrays[f"{spec['name']}/{call}/{dtype}"] = encode(path, dtype, **kwargs)
                calls[f"{spec['name']}/{call}"] = kwargs
    tokens = token_embeddings(OUT / FOLDERS[0]["name"])
    arrays[f"{FOLDERS[0]['name']}/token_embeddings/float32"] = np.concatenate(tokens)  # (sum of tokens, H)
    arrays[f"{FOLDERS[0]['name']}/token_counts"] = np.array([len(t) for t in tokens])
    np.savez_compressed(OUT / "reference.npz", **arrays)
    metadata = {
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "batch_size": BATCH_SIZE,
        "sentences": SENTENCES,
        "calls": calls,
        "folders_sha256": {spec["name"]: sha256_of_folder(OUT / spec["name"]) for spec in FOLDERS},
    }
    write_json(OUT / "reference.json", metadata)
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(FOLDERS)} folders and {len(arrays)} reference arrays to {OUT} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
