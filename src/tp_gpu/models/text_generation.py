"""Text in, text out: a decoder model and its ``tokenizer.json``, as transformers' tokenizer and ``generate``.

:class:`TextGenerator` does what a user of transformers writes by hand around ``generate``:

1. encode each prompt with the tokenizer's special tokens (``Tokenizer.encode`` applies the
   post-processor, e.g. Llama's BOS, as transformers' tokenizer does by default);
2. pad the batch on the LEFT to the longest prompt ``L`` with the pad id (the tokenizer's pad token
   if its padding is set, else the model config's ``pad_token_id``, else its first eos, else 0)::

       input_ids[b]      = [pad] * (L - n_b) + ids_b          # (B, L)
       attention_mask[b] = [0]   * (L - n_b) + [1] * n_b      # (B, L)

   (left, so that every row's next token follows its last real one; the mask hides the padding,
   so a batch gives each row what that row alone gives);
3. ``model.generate`` (:mod:`.generation`), then decode ONLY the new tokens of each row, up to its
   first end-of-sequence id, with ``skip_special_tokens=True``.

:meth:`TextGenerator.stream` yields the text of one prompt piece by piece as ``model.stream`` makes
tokens. Byte-level tokenizers split a character such as ``é`` over several tokens, and the first of
them decodes to the replacement character U+FFFD alone; so each step decodes the whole list of new
tokens and yields only what was added to the text, holding it back while the text ends in U+FFFD.
The pieces joined are the text that ``__call__`` gives.

The ``tokenizers`` library (the optional extra ``models``) is imported only when a generator is made.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from ..config import TensorParallelConfig
from ..errors import CheckpointError, ConfigError, ShapeError
from .decoder import DecoderForCausalLM
from .decoder_loading import AutoModelForCausalLM
from .hf_loader import check_model_dir
from .st_files import MissingDependencyError

__all__ = ["TextGenerator"]

#: What decodes from a byte sequence cut inside a character.
REPLACEMENT_CHAR = "\ufffd"

#: transformers' ``GenerationConfig`` default length (``max_length=20``), here in new tokens.
DEFAULT_MAX_NEW_TOKENS = 20


def _tokenizer_class() -> Any:
    """``tokenizers.Tokenizer``; MissingDependencyError, saying how to install it, where it is missing."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise MissingDependencyError(
            "TextGenerator needs the 'tokenizers' library: pip install 'tp_gpu[models]'"
        ) from exc
    return Tokenizer


def _check_prompt(prompt: Any, where: str) -> str:
    if not isinstance(prompt, str):
        raise ConfigError(f"{where} must be a str, got {type(prompt).__name__} {prompt!r}")
    return prompt


class TextGenerator:
    """A decoder LM and its tokenizer: ``generator("Once upon a time")`` gives the text that follows.

    Parameters
    ----------
    model : DecoderForCausalLM
        Any decoder of :mod:`tp_gpu.models` (GPT-2, Llama, Qwen2), split over its workers.
    tokenizer : tokenizers.Tokenizer
        The model's fast tokenizer. A private copy is kept, without the file's padding and
        truncation (transformers' tokenizer, called without ``padding``/``truncation``, ignores
        them too); its pad id, if its padding is set, pads the batch.
    """

    def __init__(self, model: DecoderForCausalLM, tokenizer: Any) -> None:
        tokenizer_class = _tokenizer_class()
        if not isinstance(model, DecoderForCausalLM):
            raise ConfigError(
                f"model must be a DecoderForCausalLM (AutoModelForCausalLM.from_pretrained), "
                f"got {type(model).__name__}"
            )
        if not isinstance(tokenizer, tokenizer_class):
            raise ConfigError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size > model.vocab_size:
            raise ConfigError(
                f"the tokenizer has {size} tokens; expected at most the model's vocab_size {model.vocab_size}"
            )
        padding = tokenizer.padding or {}
        own = tokenizer_class.from_str(tokenizer.to_str())  # the caller's object stays as it is
        own.no_padding()
        own.no_truncation()
        self.model = model
        self.tokenizer = own
        c = model.decoder_config
        first_eos = c.eos_token_ids[0] if c.eos_token_ids else None
        candidates = (padding.get("pad_id"), c.pad_token_id, first_eos, 0)
        #: The id the prompts are padded with (hidden by the attention mask, so it changes no result).
        self.pad_token_id: int = next(int(i) for i in candidates if i is not None)

    @classmethod
    def from_pretrained(
        cls, model_dir: Any, config: Optional[TensorParallelConfig] = None, **model_kwargs: Any
    ) -> TextGenerator:
        """The decoder of the Hugging Face folder ``model_dir`` and its ``tokenizer.json``.

        The model loads with :meth:`AutoModelForCausalLM.from_pretrained` (``model_kwargs``, such as
        ``pad_to_multiple_of``, go to it). The tokenizer is read first: CheckpointError naming the
        folder where ``tokenizer.json`` is missing or unreadable, MissingDependencyError without the
        ``tokenizers`` library; then no weight has been read.
        """
        tokenizer_class = _tokenizer_class()
        path = check_model_dir(model_dir, f"{cls.__name__}.from_pretrained")
        tokenizer_json = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_json):
            found = sorted(os.listdir(path))[:12]
            raise CheckpointError(
                f"{path}: tokenizer.json is missing (a fast-tokenizer file is required); found {found}"
            )
        try:
            tokenizer = tokenizer_class.from_file(tokenizer_json)
        except Exception as exc:  # tokenizers raises a plain Exception on a bad file
            raise CheckpointError(f"{tokenizer_json} is not a valid tokenizer file: {exc}") from exc
        model = AutoModelForCausalLM.from_pretrained(path, config, **model_kwargs)
        return cls(model, tokenizer)

    # ------------------------------------------------------------------ text -> ids -> text

    def encode(self, prompts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)``, each ``(B, L)``, of ``prompts`` padded on the left."""
        rows = [e.ids for e in self.tokenizer.encode_batch(list(prompts))]
        for i, row in enumerate(rows):
            if not row:
                raise ShapeError(
                    f"prompt {i} ({prompts[i]!r}) encodes to no token (the tokenizer adds no BOS); "
                    "expected at least one"
                )
        longest = max(len(row) for row in rows)
        ids = np.full((len(rows), longest), self.pad_token_id, dtype=np.int64)  # (B, L)
        mask = np.zeros((len(rows), longest), dtype=np.int64)  # (B, L)
        for b, row in enumerate(rows):
            ids[b, longest - len(row) :] = row
            mask[b, longest - len(row) :] = 1
        return ids, mask

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens``, special tokens skipped."""
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True)

    def _eos(self, generate_kwargs: dict) -> Set[int]:
        """The end-of-sequence ids ``generate`` stops at: the caller's, else the model config's."""
        given = generate_kwargs.get("eos_token_id")
        if given is None:
            return set(self.model.decoder_config.eos_token_ids)
        return {int(i) for i in np.atleast_1d(np.asarray(given)).tolist()}

    # ------------------------------------------------------------------ generation

    def __call__(
        self,
        prompts: Union[str, Sequence[str]],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        **generate_kwargs: Any,
    ) -> Union[str, List[str]]:
        """The text generated after each prompt (a str for a str, a list for a sequence).

        ``generate_kwargs`` go to ``model.generate`` (``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``seed``, ``eos_token_id``, ``pad_token_id``). Only the new tokens are decoded,
        each row up to its first end-of-sequence id. An empty list, or a prompt that is not a str,
        is a ConfigError naming it, before anything runs.
        """
        batch = self._check_prompts(prompts)
        ids, mask = self.encode(batch)
        generate_kwargs.setdefault("pad_token_id", self.pad_token_id)
        out = self.model.generate(ids, mask, max_new_tokens=max_new_tokens, **generate_kwargs)  # (B, L+n)
        eos = self._eos(generate_kwargs)
        texts = [self.decode(_until(row, eos)) for row in out[:, ids.shape[1] :]]
        return texts[0] if isinstance(prompts, str) else texts

    def stream(
        self, prompt: str, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **generate_kwargs: Any
    ) -> Iterator[str]:
        """Yield the text after ``prompt`` in pieces, as the tokens are made (see the module's notes).

        The prompt and the settings are checked when this is called, and the prompt's pass, which
        makes the first token, runs then too; each later token is made as the iterator is read.
        """
        _check_prompt(prompt, "prompt")
        ids, mask = self.encode([prompt])
        generate_kwargs.setdefault("pad_token_id", self.pad_token_id)
        tokens = self.model.stream(ids, mask, max_new_tokens=max_new_tokens, **generate_kwargs)
        first = next(tokens, None)  # runs every check of model.stream, and the prompt's pass, now
        return self._pieces(first, tokens, self._eos(generate_kwargs))

    def _pieces(
        self, first: Optional[np.ndarray], rest: Iterator[np.ndarray], eos: Set[int]
    ) -> Iterator[str]:
        new: List[int] = []
        shown = ""
        for step in itertools.chain([] if first is None else [first], rest):
            token = int(step[0])
            if token in eos:
                break
            new.append(token)
            text = self.decode(new)
            if text.endswith(REPLACEMENT_CHAR) or not text.startswith(shown):
                continue  # a character cut in the middle: wait for its next token
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
        text = self.decode(new)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown) :]  # what was held back at the end (an unfinished character)

    def _check_prompts(self, prompts: Any) -> List[str]:
        if isinstance(prompts, str):
            return [prompts]
        if not isinstance(prompts, Sequence):
            raise ConfigError(
                f"prompts must be a str or a sequence of str, got {type(prompts).__name__} {prompts!r}"
            )
        if len(prompts) == 0:
            raise ConfigError(f"prompts must hold at least one prompt, got {prompts!r}")
        return [_check_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)]

    def __repr__(self) -> str:
        return (
            f"TextGenerator({type(self.model).__name__}, "
            f"{self.tokenizer.get_vocab_size(with_added_tokens=True)} tokens, pad {self.pad_token_id})"
        )


def _until(row: np.ndarray, eos: Set[int]) -> List[int]:
    """The tokens of ``row`` before its first end-of-sequence id."""
    out: List[int] = []
    for token in row.tolist():
        if token in eos:
            break
        out.append(token)
    return out
