"""GatedMLP: Llama's and Qwen2's MLP, ``down(act(gate(x)) * up(x))``, with the gate and up projections fused.

The gate and up projections are one :class:`~tp_gpu.ColumnParallelLinear` of ``2 * intermediate``
outputs whose logical columns are interleaved pairs, ``[gate_0, up_0, gate_1, up_1, ...]``, split in
whole pairs (``unit=2``): each worker holds the gate and up columns of the same ``intermediate``
indices, and each device block is its workers' pairs side by side. :class:`SwiGLU` turns a block of
``2 n`` columns into ``n`` columns where it lies, split as the row-parallel ``down`` projection's input.

Worked example: ``intermediate = 5`` on 2 workers. ``gate_up`` splits its 10 columns as 6 + 4
(3 + 2 pairs); worker 0 holds ``[g0 u0 g1 u1 g2 u2]``, worker 1 ``[g3 u3 g4 u4]``; SwiGLU gives
``[h0 h1 h2]`` and ``[h3 h4]``, the rows ``down`` splits as 3 + 2.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..autograd import Context, Function
from ..backends.base import host_array
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, ShapeError
from ..module import Module
from ..partition import BlockLayout
from ..placements import Partial, Placement, Split
from ..tensor import Tensor, new_tensor
from .activations import Activation, get_activation
from .base import as_array_like, check_layout, check_seed
from .linear import ColumnParallelLinear, RowParallelLinear, check_bias_flag, dense_weight
from .linear_loading import is_no_bias

__all__ = ["GatedMLP", "SwiGLU"]


class _SwiGLUContext(Context):
    __slots__ = ("h", "activation", "n_args")

    h: Tensor  # the interleaved input (..., 2n)
    activation: Activation
    n_args: int  # given to forward: 2 or 3


class SwiGLU(Function):
    """``y = act(h[..., 0::2]) * h[..., 1::2]`` on each device's block: ``(..., 2n) -> (..., n)``.

    ``forward(ctx, h, activation, layout)``: ``h`` holds interleaved (gate, up) pairs on its last axis
    and may lie anywhere but ``Partial`` (``act`` of a sum is not a sum). Split on its last axis in whole
    pairs, the output is ``Split(-1, layout)``, ``layout`` splitting ``n`` in halves of ``h``'s split
    (the down projection's input layout); placed otherwise, the output is placed like ``h``.
    ``activation`` is an :class:`~tp_gpu.layers.activations.Activation` or its name (``"silu"``).

    Backward, per device: ``dgate = dy * up * act'(gate)``, ``dup = dy * act(gate)``, interleaved
    again as ``dh``, placed like ``h``.
    """

    ctx_class = _SwiGLUContext

    @staticmethod
    def forward(
        ctx: _SwiGLUContext,
        h: Tensor,
        activation: Union[Activation, str, None],
        layout: Optional[BlockLayout] = None,
    ) -> Tensor:
        act = activation if isinstance(activation, Activation) else get_activation(activation)
        placement = _output_placement(h, layout)
        backend = h.backend
        xp = np if backend is None else backend.xp
        blocks = {}
        for d, block in h.blocks.items():
            if backend is None:
                blocks[d] = act.forward(xp, block[..., 0::2]) * block[..., 1::2]
            else:
                with backend.device(d):
                    blocks[d] = act.forward(xp, block[..., 0::2]) * block[..., 1::2]  # (..., n_d)
        if ctx.needs_input_grad:
            ctx.h, ctx.activation, ctx.n_args = h, act, len(ctx.needs_input_grad)
        shape = (*h.shape[:-1], h.shape[-1] // 2)
        return new_tensor(blocks, placement, shape, h.dtype, backend, h.comm)

    @staticmethod
    def backward(ctx: _SwiGLUContext, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        h, act = ctx.h, ctx.activation
        backend = grad.backend
        xp = np if backend is None else backend.xp
        blocks = {}
        for d, g in grad.blocks.items():
            if backend is None:
                blocks[d] = _swiglu_grad(xp, act, h.blocks[d], g)
            else:
                with backend.device(d):
                    blocks[d] = _swiglu_grad(xp, act, h.blocks[d], g)
        dh = new_tensor(blocks, h.placement, h.shape, grad.dtype, backend, grad.comm)
        return (dh, *[None] * (ctx.n_args - 1))  # None for activation (and layout)


def _swiglu_grad(xp: Any, act: Activation, h: Any, dy: Any) -> Any:
    """``dh`` ``(..., 2n)`` of one block: ``[dgate_0, dup_0, dgate_1, ...]`` from ``dy`` ``(..., n)``."""
    gate, up = h[..., 0::2], h[..., 1::2]  # (..., n) each
    dgate = act.grad(xp, gate, dy * up)  # dy * up * act'(gate)
    dup = dy * act.forward(xp, gate)
    return xp.stack([dgate, dup], axis=-1).reshape(h.shape)  # (..., n, 2) -> (..., 2n)


def _output_placement(h: Tensor, layout: Optional[BlockLayout]) -> Placement:
    """Where SwiGLU's output of ``h`` lies, or ShapeError for an ``h`` it cannot run on."""
    p = h.placement
    if isinstance(p, Partial) or h.ndim < 1 or h.shape[-1] % 2:
        raise ShapeError(
            f"SwiGLU input must hold whole (gate, up) pairs on its last axis, whole or split, not partial "
            f"sums; got shape {h.shape} placed {p!r}"
        )
    if not (isinstance(p, Split) and p.axis == h.ndim - 1):
        return p
    halves = None if layout is None else ([2 * s for s in layout.sizes], [2 * c for c in layout.capacities])
    if (
        halves != (p.layout.sizes, p.layout.capacities)
        or layout is None
        or layout.devices != p.layout.devices
    ):
        got = None if layout is None else f"{layout.sizes} on devices {layout.devices}"
        raise ShapeError(
            f"SwiGLU input split {p.layout.sizes} over the workers needs an output layout of half those "
            f"sizes, {[s // 2 for s in p.layout.sizes]} on devices {p.layout.devices}; got {got}"
        )
    return Split(p.axis, layout)


class GatedMLP(Module):
    """``y = down(act(gate(x)) * up(x))``: Llama's and Qwen2's MLP (SwiGLU, Shazeer, 2020).

    ``gate_up`` is a :class:`ColumnParallelLinear` ``(hidden, 2 * intermediate)`` with
    ``gather_output=False`` and ``unit=2``, its columns the interleaved pairs ``(gate_j, up_j)``;
    :class:`SwiGLU` combines each pair where it lies; ``down`` is a :class:`RowParallelLinear`
    ``(intermediate, hidden)`` that takes those shards as its split input. Forward needs one reduction
    (in ``down``), backward one (of ``dx`` in ``gate_up``), as Megatron's MLP. With
    ``config.sequence_parallel`` a sequence-split ``x`` is all-gathered by ``gate_up`` and ``down``
    reduce-scatters its output into sequence slices.

    Hugging Face names: ``mlp.gate_proj`` / ``mlp.up_proj`` are the even / odd columns of
    ``gate_up`` (load them with :meth:`load_dense`), ``mlp.down_proj`` is ``down``.

    Parameters
    ----------
    hidden, intermediate : int
        Model width and MLP width; ``intermediate`` splits over any worker count.
    config : TensorParallelConfig, optional
        Shared by both linears (``gather_output`` is forced off for ``gate_up``).
    seed : int
        ``gate_up`` is seeded with ``seed`` and ``down`` with ``seed + 1``.
    bias : bool
        Biases in all three projections (Llama's ``mlp_bias``); off by default, as in Llama and Qwen2.
    activation : str
        ``"silu"`` (Llama, Qwen2) or another name of :func:`~tp_gpu.layers.activations.get_activation`.
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        config: Optional[TensorParallelConfig] = None,
        *,
        seed: int = 0,
        bias: bool = False,
        activation: Optional[str] = "silu",
    ) -> None:
        super().__init__()
        self.activation = get_activation(activation)
        bias = check_bias_flag(bias)
        seed = check_seed(seed)
        self.hidden = check_positive_int(hidden, "hidden")
        self.intermediate = check_positive_int(intermediate, "intermediate")
        config = TensorParallelConfig() if config is None else config
        if not isinstance(config, TensorParallelConfig):
            raise ConfigError(f"config must be a TensorParallelConfig or None, got {type(config).__name__}")
        column = dataclasses.replace(config, gather_output=False)
        self.gate_up = ColumnParallelLinear(hidden, 2 * intermediate, column, seed=seed, unit=2, bias=bias)
        self.down = RowParallelLinear(
            intermediate, hidden, config, seed=seed + 1, input_is_parallel=True, bias=bias
        )
        pairs, rows = self.gate_up.layout, self.down.layout
        if pairs.sizes != [2 * s for s in rows.sizes] or pairs.devices != rows.devices:
            raise ConfigError(  # balanced splits in whole pairs always agree; a guard, not a case
                f"GatedMLP: gate_up splits {pairs.sizes} columns but down splits {rows.sizes} rows; "
                f"expected twice the rows, on the same devices"
            )
        self.config = config

    @property
    def has_bias(self) -> bool:
        return self.gate_up.has_bias

    @classmethod
    def from_dense(
        cls,
        gate_weight: Any,
        up_weight: Any,
        down_weight: Any,
        gate_bias: Any = None,
        up_bias: Any = None,
        down_bias: Any = None,
        config: Optional[TensorParallelConfig] = None,
        *,
        layout: str = "out_in",
        activation: Optional[str] = "silu",
    ) -> GatedMLP:
        """A GatedMLP holding the given dense projections (see :meth:`load_dense`), sized from
        ``gate_weight``; built with biases when any bias is an array."""
        hidden, intermediate = dense_weight(gate_weight, check_layout(layout), "GatedMLP gate_weight").shape
        biases = (gate_bias, up_bias, down_bias)
        bias = any(b is not None and not is_no_bias(b) for b in biases)
        mlp = cls(hidden, intermediate, config, bias=bias, activation=activation)
        mlp.load_dense(gate_weight, up_weight, down_weight, *biases, layout=layout)
        return mlp

    def load_dense(
        self,
        gate_weight: Any,
        up_weight: Any,
        down_weight: Any,
        gate_bias: Any = None,
        up_bias: Any = None,
        down_bias: Any = None,
        *,
        layout: str = "out_in",
    ) -> None:
        """Overwrite the three projections, in place, from dense arrays.

        With ``layout="out_in"`` (the default: Hugging Face's ``nn.Linear``) ``gate_weight`` and
        ``up_weight`` are ``(intermediate, hidden)`` and ``down_weight`` ``(hidden, intermediate)``;
        ``"in_out"`` is their transpose. A ``None`` bias is zero (or absent without biases); an array
        bias needs an MLP built with ``bias=True``. Everything is checked before anything changes,
        and loaded in one ``load_state_dict``.
        """
        layout = check_layout(layout)
        gate = self._half(gate_weight, layout, "gate_weight")  # (H, I)
        up = self._half(up_weight, layout, "up_weight")  # (H, I)
        pair_bias = self._pair_bias(gate_bias, up_bias)
        state: Dict[str, Any] = {}
        for prefix, weight, bias, given in (
            ("gate_up", _interleave(gate, up), pair_bias, "in_out"),
            ("down", down_weight, down_bias, layout),
        ):
            layer = getattr(self, prefix)
            for name, value in layer.dense_state(weight, bias, given, f"GatedMLP {prefix}").items():
                state[f"{prefix}.{name}"] = value
        self.load_state_dict(state)

    def dense_parts(self) -> Dict[str, Optional[np.ndarray]]:
        """The logical projections as host arrays in our ``in_out`` layout: ``gate`` and ``up``
        ``(hidden, intermediate)``, ``down`` ``(intermediate, hidden)``, and their biases (None without)."""
        w, b = self.gate_up.full_weight(), self.gate_up.full_bias()  # (H, 2I), (2I,)
        return {
            "gate": w[:, 0::2],
            "up": w[:, 1::2],
            "down": self.down.full_weight(),
            "gate_bias": None if b is None else b[0::2],
            "up_bias": None if b is None else b[1::2],
            "down_bias": self.down.full_bias(),
        }

    def forward(self, x: Any) -> Tensor:
        """``y`` of shape ``(..., hidden)`` on the output device (sequence slices with sequence
        parallelism), for ``x`` of shape ``(..., hidden)``."""
        h = self.gate_up(x)  # device d: (..., 2 * I_d), pairs side by side
        return self.down(SwiGLU.apply(h, self.activation, self.down.layout))  # (..., I_d) -> (..., H)

    def _half(self, weight: Any, layout: str, what: str) -> Any:
        """``gate_weight`` or ``up_weight`` as ``(hidden, intermediate)``; else ShapeError (in ``layout``)."""
        w = dense_weight(weight, layout, f"GatedMLP {what}")
        if tuple(w.shape) != (self.hidden, self.intermediate):
            expected = (self.hidden, self.intermediate)
            dims = "(hidden, intermediate)"
            if layout == "out_in":
                expected, dims = expected[::-1], "(intermediate, hidden)"
            got = tuple(w.shape) if layout == "in_out" else tuple(w.shape)[::-1]
            raise ShapeError(
                f"GatedMLP {what} must have shape {expected} {dims} for layout={layout!r}, got {got}"
            )
        return w

    def _pair_bias(self, gate_bias: Any, up_bias: Any) -> Any:
        """The interleaved ``(2 * intermediate,)`` bias of ``gate_up``: None when both are None or
        False, else each checked to be ``(intermediate,)`` (a None one zero)."""
        given = [b for b in (gate_bias, up_bias) if b is not None and not is_no_bias(b)]
        if not given:
            return None
        if not self.has_bias:
            return given[0]  # dense_state refuses it, naming the bias=False build
        halves = []
        for b, what in ((gate_bias, "gate_bias"), (up_bias, "up_bias")):
            if b is None or is_no_bias(b):
                halves.append(np.zeros(self.intermediate))
                continue
            array = as_array_like(b, f"GatedMLP {what}")
            if tuple(array.shape) != (self.intermediate,):
                raise ShapeError(
                    f"GatedMLP {what} must have shape ({self.intermediate},) (intermediate,), "
                    f"got {tuple(array.shape)}"
                )
            halves.append(array)
        return _interleave(*halves)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, intermediate={self.intermediate}, activation={self.activation.name!r}"
            + (", bias=True" if self.has_bias else "")
        )


def _interleave(gate: Any, up: Any) -> np.ndarray:
    """``[gate_0, up_0, gate_1, up_1, ...]`` along the last axis, on the host: ``(..., n)`` twice ->
    ``(..., 2n)``. Loading then splits it to the devices."""
    g, u = host_array(gate), host_array(up)
    return np.stack([g, u], axis=-1).reshape(*g.shape[:-1], 2 * g.shape[-1])  # (..., n, 2) -> (..., 2n)
