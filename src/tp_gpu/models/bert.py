"""BertModel: a pretrained BERT encoder, tensor-parallel end to end (Devlin et al., 2019).

The encoder is ``L`` post-norm transformer layers over BERT's embeddings::

    x_0 = LayerNorm(W[ids] + P[0 .. S-1] + T[token_type_ids])       # (B, S, H)
    h_l = LayerNorm(x_{l-1} + Attention(x_{l-1}, mask))              # (B, S, H)
    x_l = LayerNorm(h_l + GELU(h_l A_l + a_l) B_l + b_l)             # (B, S, H)

and :meth:`BertModel.forward` returns the last hidden state ``x_L``.

Every matrix is split over the workers as Megatron-LM splits it: the word
table by vocabulary rows, Q/K/V by whole heads (column-parallel), the
attention output and the MLP's second matrix by rows (row-parallel), the
MLP's first matrix by columns. A layer costs one reduction after the
attention and one after the MLP.

Hugging Face names map onto the module tree as follows (``{i}`` a layer):

=============================================  =============================================
Hugging Face (``bert.`` prefix optional)       tp_gpu ``BertModel``
=============================================  =============================================
``embeddings.word_embeddings.weight``          ``embeddings.word_embeddings.weight``
``embeddings.position_embeddings.weight``      ``embeddings.position_embeddings.weight``
``embeddings.token_type_embeddings.weight``    ``embeddings.token_type_embeddings.weight``
``embeddings.LayerNorm.weight/bias``           ``embeddings.norm.weight/bias``
``encoder.layer.{i}.attention.self.*``         ``encoder.{i}.attention.qkv`` (Q, K, V fused per head)
``encoder.layer.{i}.attention.output.dense``   ``encoder.{i}.attention.out`` (transposed)
``encoder.layer.{i}.attention.output.LayerNorm``  ``encoder.{i}.attention_norm``
``encoder.layer.{i}.intermediate.dense``       ``encoder.{i}.mlp.fc1`` (transposed)
``encoder.layer.{i}.output.dense``             ``encoder.{i}.mlp.fc2`` (transposed)
``encoder.layer.{i}.output.LayerNorm``         ``encoder.{i}.mlp_norm``
=============================================  =============================================

``embeddings.position_ids`` (a buffer) and ``pooler.*`` (used only by
next-sentence prediction) are not loaded.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from ..config import TensorParallelConfig
from ..errors import ConfigError
from ..host import to_numpy
from ..layers.base import check_seed
from ..layers.bert_embeddings import BertEmbeddings
from ..layers.norm import LayerNorm
from ..layers.transformer import ParallelTransformerLayer
from ..module import Module, Sequential
from ..tensor import Tensor
from .hf_loader import BertConfig, CheckpointReader, check_model_dir, resolve_config

__all__ = ["BertModel", "load_hf_weights"]

PathLike = Union[str, "os.PathLike[str]"]
Getter = Callable[[str], np.ndarray]


class BertModel(Module):
    """A BERT encoder whose every weight matrix is split over ``config``'s workers.

    Parameters
    ----------
    bert_config : BertConfig
        The sizes (``config.json`` of a Hugging Face folder: :meth:`BertConfig.from_json`).
    config : TensorParallelConfig, optional
        Workers, backend, devices and dtype (default ``TensorParallelConfig()``).
    seed : int
        Seeds the random initial weights (which :meth:`from_pretrained` overwrites).

    Attributes
    ----------
    embeddings : BertEmbeddings
    encoder : Sequential of ParallelTransformerLayer, named ``"0"``, ``"1"``, ...
    """

    def __init__(
        self, bert_config: BertConfig, config: Optional[TensorParallelConfig] = None, *, seed: int = 0
    ) -> None:
        super().__init__()
        if not isinstance(bert_config, BertConfig):
            raise ConfigError(f"bert_config must be a BertConfig, got {type(bert_config).__name__}")
        config = TensorParallelConfig() if config is None else config
        if not isinstance(config, TensorParallelConfig):
            raise ConfigError(f"config must be a TensorParallelConfig or None, got {type(config).__name__}")
        seed = check_seed(seed)
        c = bert_config
        self.bert_config = c
        self.config = config
        self.embeddings = BertEmbeddings(
            c.vocab_size, c.hidden_size, c.max_position_embeddings, c.type_vocab_size, config,
            seed=seed, eps=c.layer_norm_eps,
        )  # fmt: skip
        layers = [
            ParallelTransformerLayer(
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size,
                config,
                seed=seed + 3 + 4 * i,
                activation=c.hidden_act,
                eps=c.layer_norm_eps,
            )  # fmt: skip
            for i in range(c.num_hidden_layers)
        ]
        self.encoder = Sequential(*layers)

    @classmethod
    def from_pretrained(cls, model_dir: PathLike, config: Optional[TensorParallelConfig] = None) -> BertModel:
        """The BERT of the Hugging Face folder ``model_dir``, split over ``config``'s workers, in eval mode.

        Reads ``config.json`` (which must say ``"model_type": "bert"``) and
        ``model.safetensors`` (Hugging Face names, with or without the
        ``bert.`` prefix). Every tensor's name, shape and dtype is checked
        from the file's header before any is read; then the tensors are read
        one at a time from the memory-mapped file and split onto the devices,
        so the host never holds more than one full tensor besides the model.

        Raises CheckpointError for a missing or foreign folder or checkpoint
        (naming the path and what is missing or wrong) and ConfigError for a
        ``config.json`` that is not a BERT one.
        """
        path = check_model_dir(model_dir, f"{cls.__name__}.from_pretrained")
        bert_config = resolve_config(path)
        with CheckpointReader(path) as reader:
            reader.check(bert_config)
            model = cls(bert_config, config)
            load_hf_weights(model, reader.get)
        model.eval()
        return model

    def save_pretrained(self, folder: PathLike, *, max_shard_size: Union[int, str] = "50GB") -> None:
        """Write a Hugging Face folder (``config.json``, ``model.safetensors`` or shards and an index)
        that ``transformers.BertModel`` and :meth:`from_pretrained` load; collective with several
        processes (rank 0 writes). See :func:`tp_gpu.models.hf_export.save_pretrained`."""
        from .hf_export import save_pretrained

        save_pretrained(self, folder, max_shard_size=max_shard_size)

    # ------------------------------------------------------------------ properties

    @property
    def layers(self) -> List[ParallelTransformerLayer]:
        """The transformer layers, in order."""
        return self.encoder.children()  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.config.dtype)

    def to_numpy(self, array: Any) -> np.ndarray:
        """An output of :meth:`forward` (a Tensor, or an array of the backend) as a host NumPy array."""
        return to_numpy(array)

    # ------------------------------------------------------------------ compute

    def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Tensor:
        """The last hidden state ``x_L`` ``(B, S, hidden_size)``, a Tensor on the output device.

        ``input_ids``: integers ``(B, S)``, ``S <= max_position_embeddings``.
        ``attention_mask``: ``(B, S)``, 1 for tokens and 0 for padding, as
        Hugging Face takes it (padded keys get ``finfo(dtype).min`` added to
        their scores); ``None`` attends everywhere. ``token_type_ids``:
        ``(B, S)`` or ``(S,)``, zeros by default.

        The result lives on the model's output device (worker 0's unless the
        config says otherwise; with ``config.sequence_parallel``, a
        ShardedTensor split along the sequence); ``np.asarray(out)`` or
        :meth:`to_numpy` brings it to the host. ``out.backward(dy)`` (or a loss
        built from it) accumulates every parameter's gradient; run inference
        under ``with tp_gpu.no_grad():`` to record nothing and keep no
        activation. Everything is checked before anything is computed.
        """
        ids, types, _ = self.embeddings.check_ids(input_ids, token_type_ids)
        batch, seq = ids.shape
        self.layers[0].attention.check_mask(attention_mask, batch, seq)
        x = self.embeddings(ids, types)  # (B, S, H)
        for layer in self.layers:
            x = layer(x, attention_mask)  # (B, S, H)
        return x

    def extra_repr(self) -> str:
        c = self.bert_config
        return (
            f"layers={c.num_hidden_layers}, hidden={c.hidden_size}, heads={c.num_attention_heads}, "
            f"n_workers={self.n_workers}, backend={self.backend.name!r}, dtype={self.dtype.name!r}"
        )

    # ------------------------------------------------------------------ Hugging Face names

    def hf_state_dict(self) -> Dict[str, np.ndarray]:
        """The model's logical weights as host arrays under their Hugging Face names and layouts.

        The inverse of loading: ``safetensors.numpy.save_file(model.hf_state_dict(), path)``
        writes a checkpoint that ``transformers.BertModel`` (and :meth:`from_pretrained`) reads.
        """
        state = {
            f"embeddings.{k}": v for k, v in self.embeddings.state_dict().items() if not k.startswith("norm.")
        }
        state["embeddings.LayerNorm.weight"] = self.embeddings.norm.weight.full()
        state["embeddings.LayerNorm.bias"] = self.embeddings.norm.bias.full()
        for i, layer in enumerate(self.layers):
            state.update(_layer_hf_state(layer, f"encoder.layer.{i}."))
        return state


def _norms(layer: ParallelTransformerLayer) -> Tuple[Tuple[str, LayerNorm], Tuple[str, LayerNorm]]:
    """A layer's two LayerNorms under their Hugging Face names (``encoder.layer.{i}.`` stripped)."""
    return (("attention.output.LayerNorm", layer.attention_norm), ("output.LayerNorm", layer.mlp_norm))


def _layer_hf_state(layer: ParallelTransformerLayer, prefix: str) -> Dict[str, np.ndarray]:
    """One layer's weights under Hugging Face names, linear weights ``(out, in)``."""
    q_w, q_b, k_w, k_b, v_w, v_b = layer.attention.split_qkv(layout="out_in")
    linears = {
        "attention.output.dense": layer.attention.out,
        "intermediate.dense": layer.mlp.fc1,
        "output.dense": layer.mlp.fc2,
    }
    state = {f"{prefix}{name}.weight": lin.full_weight().T for name, lin in linears.items()}
    state.update({f"{prefix}{name}.bias": lin.full_bias() for name, lin in linears.items()})
    for part, w, b in (("query", q_w, q_b), ("key", k_w, k_b), ("value", v_w, v_b)):
        state[f"{prefix}attention.self.{part}.weight"] = w
        state[f"{prefix}attention.self.{part}.bias"] = b
    for name, norm in (
        ("attention.output.LayerNorm", layer.attention_norm),
        ("output.LayerNorm", layer.mlp_norm),
    ):
        state[f"{prefix}{name}.weight"] = norm.weight.full()
        state[f"{prefix}{name}.bias"] = norm.bias.full()
    return state


def load_hf_weights(model: BertModel, get: Getter) -> None:
    """Load every weight of ``model`` from ``get(hf_name)`` (a host array per Hugging Face name).

    Tensors are fetched one (Q, K, V: three) at a time and split onto the
    devices at once, so only that tensor is held on the host. Shapes are
    checked by each layer; :meth:`CheckpointReader.check` checks them all
    from the file header first.
    """
    emb = model.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        getattr(emb, name).load_dense(get(f"embeddings.{name}.weight"))
    emb.norm.load_dense(get("embeddings.LayerNorm.weight"), get("embeddings.LayerNorm.bias"))
    for i, layer in enumerate(model.layers):
        _load_layer(layer, get, f"encoder.layer.{i}.")


def _load_layer(layer: ParallelTransformerLayer, get: Getter, prefix: str) -> None:
    """Load one ``BertLayer`` (``prefix`` is ``"encoder.layer.{i}."``); linear weights are ``(out, in)``."""
    qkv = [
        get(f"{prefix}attention.self.{part}.{kind}")
        for part in ("query", "key", "value")
        for kind in ("weight", "bias")
    ]
    layer.attention.load_qkv(*qkv, layout="out_in")
    del qkv
    linears = {"attention.output.dense": layer.attention.out, "intermediate.dense": layer.mlp.fc1}
    linears["output.dense"] = layer.mlp.fc2
    for name, linear in linears.items():
        linear.load_dense(get(f"{prefix}{name}.weight"), get(f"{prefix}{name}.bias"), layout="out_in")
    for name, norm in (
        ("attention.output.LayerNorm", layer.attention_norm),
        ("output.LayerNorm", layer.mlp_norm),
    ):
        norm.load_dense(get(f"{prefix}{name}.weight"), get(f"{prefix}{name}.bias"))
