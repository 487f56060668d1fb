"""Loading the linear layers from dense weights: ``from_dense``, ``load_dense``, ``dense_state``.

Two weight layouts are accepted: ours, ``(n_in, n_out)`` (``layout="in_out"``), and PyTorch
``nn.Linear``'s ``(n_out, n_in)`` (``layout="out_in"``). A bias is an array of ``n_out`` numbers,
``None`` (zero) or ``False`` (no bias parameter at all, as ``nn.Linear(..., bias=False)``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from ..config import TensorParallelConfig
from ..errors import ConfigError, ShapeError
from ..module import Module
from .base import as_array_like, check_layout

__all__ = ["dense_weight", "DenseLoading", "is_no_bias"]


def is_no_bias(bias: Any) -> bool:
    """True for ``False`` (a NumPy ``False`` too): *no bias parameter*, as opposed to ``None``, a zero one."""
    return isinstance(bias, (bool, np.bool_)) and not bias


def dense_weight(weight: Any, layout: Optional[str], what: str) -> Any:
    """``weight`` as an array in our ``(n_in, n_out)`` layout (a view, never a copy), checked to be 2-D.

    ``layout=None`` means ``"in_out"``, except for a ``torch.Tensor``: PyTorch keeps
    ``nn.Linear.weight`` as ``(n_out, n_in)``, and a square one would load transposed without a
    word, so a tensor needs its layout spelt out (ConfigError otherwise). Torch is recognised by
    the module of the weight's type, without importing it.
    """
    if layout is not None:
        layout = check_layout(layout)
    is_torch = any(c.__module__.partition(".")[0] == "torch" for c in type(weight).__mro__)
    w = as_array_like(weight, what)
    if layout is None:
        if is_torch:
            raise ConfigError(
                f"{what} is a torch.Tensor of shape {tuple(w.shape)}: say which layout it is in, "
                "layout='out_in' for nn.Linear.weight (n_out, n_in) or layout='in_out' for (n_in, n_out) "
                "(or build the layer with tp_gpu.from_torch(linear), which reads it from the module)"
            )
        layout = "in_out"
    if w.ndim != 2:
        dims = "(n_in, n_out)" if layout == "in_out" else "(n_out, n_in)"
        raise ShapeError(f"{what} must be 2-D {dims} for layout={layout!r}, got shape {tuple(w.shape)}")
    return w if layout == "in_out" else w.T


class DenseLoading(Module):
    """``from_dense`` / ``load_dense`` / ``dense_state`` of a linear layer with ``n_in``, ``n_out``,
    ``dtype`` and ``has_bias`` (a base of :class:`~tp_gpu.layers.linear._ParallelLinear`)."""

    n_in: int
    n_out: int
    dtype: np.dtype
    has_bias: bool

    @classmethod
    def from_dense(
        cls,
        weight: Any,
        bias: Any = None,
        config: Optional[TensorParallelConfig] = None,
        *,
        layout: Optional[str] = None,
        **kwargs: Any,
    ):
        """A layer holding the dense ``weight`` (and ``bias``), split over ``config``'s workers.

        ``n_in`` and ``n_out`` come from the weight's shape: ``(n_in, n_out)``
        for ``layout="in_out"`` (the default for arrays), ``(n_out, n_in)`` for
        ``layout="out_in"`` (PyTorch ``nn.Linear``, so ``from_dense(lin.weight,
        lin.bias, layout="out_in")`` loads a torch layer; a ``torch.Tensor``
        weight needs ``layout`` given, see :func:`tp_gpu.from_torch`). ``config`` defaults to
        ``TensorParallelConfig()``; the weights are cast to its dtype. A
        ``None`` bias is zero (a bias parameter that trains); ``bias=False``
        builds the layer without one (``bias=False`` of the constructor). Other
        keyword arguments go to the constructor (``input_is_parallel`` of the
        row layer). See :meth:`load_dense`.
        """
        n_in, n_out = dense_weight(weight, layout, f"{cls.__name__}.from_dense weight").shape
        if is_no_bias(bias):
            kwargs["bias"] = False
        build: Any = cls  # a linear layer's constructor (n_in, n_out, config, **kwargs)
        layer = build(n_in, n_out, config, **kwargs)
        layer.load_dense(weight, bias, layout=layout)
        return layer

    def dense_state(
        self, weight: Any, bias: Any, layout: Optional[str] = None, what: str = ""
    ) -> Dict[str, Any]:
        """The state dict ``{"weight": (n_in, n_out), "bias": (n_out,)}`` of dense ``weight`` and ``bias``
        (``{"weight": ...}`` alone for a layer built with ``bias=False``).

        Checks shapes with messages in the caller's layout (naming ``what``,
        by default the layer's class), which point at the other layout when
        the weight would have fit it; a ``None`` bias is zero. A layer without
        a bias takes ``None`` or ``False`` (ConfigError for an array); a layer
        with one refuses ``False`` (ConfigError: build it with ``bias=False``). ``layout=None``
        is ``"in_out"`` for arrays and refused for a ``torch.Tensor`` (see
        :func:`dense_weight`). Nothing is written.
        """
        name = what or type(self).__name__
        w = dense_weight(weight, layout, f"{name} weight")
        layout = layout or "in_out"
        other = "out_in" if layout == "in_out" else "in_out"
        if tuple(w.shape) != (self.n_in, self.n_out):
            found = tuple(w.shape) if layout == "in_out" else tuple(w.shape)[::-1]
            expected = (self.n_in, self.n_out) if layout == "in_out" else (self.n_out, self.n_in)
            dims = "(n_in, n_out)" if layout == "in_out" else "(n_out, n_in)"
            hint = ""
            if tuple(w.shape)[::-1] == (self.n_in, self.n_out):
                torch_note = " (PyTorch nn.Linear's (n_out, n_in))" if other == "out_in" else ""
                hint = f"; it would fit layout={other!r}{torch_note}: pass that if it is its layout"
            raise ShapeError(
                f"{name} weight must have shape {expected} {dims} for layout={layout!r}, got {found}{hint}"
            )
        if not self.has_bias:
            if bias is None or is_no_bias(bias):
                return {"weight": w}
            shape = tuple(getattr(bias, "shape", ()))
            raise ConfigError(
                f"{name} was built with bias=False, so it has no bias to load; got a bias of shape {shape}, "
                "expected None or False (build the layer with bias=True to hold one)"
            )
        if is_no_bias(bias):
            raise ConfigError(
                f"{name} has a bias parameter; bias=False asks for none: build the layer with bias=False "
                "(or from_dense(weight, False)), or pass None for a zero bias"
            )
        if bias is None:
            return {"weight": w, "bias": np.zeros(self.n_out, dtype=self.dtype)}
        b = as_array_like(bias, f"{name} bias")
        if tuple(b.shape) != (self.n_out,):
            hint = ""
            if self.n_in != self.n_out and tuple(b.shape) == (self.n_in,):
                hint = (
                    f"; the bias has n_in={self.n_in} entries, as if the weight were in layout={other!r}"
                    + (" (PyTorch nn.Linear's (n_out, n_in))" if other == "out_in" else "")
                    + f": pass layout={other!r} if it is"
                )
            raise ShapeError(
                f"{name} bias must have shape ({self.n_out},) (n_out,), got {tuple(b.shape)}{hint}"
            )
        return {"weight": w, "bias": b}

    def load_dense(self, weight: Any, bias: Any = None, *, layout: Optional[str] = None) -> None:
        """Overwrite the weight and bias, in place, from dense (unsharded) arrays.

        Parameters
        ----------
        weight : array
            The full weight: ``(n_in, n_out)`` for ``layout="in_out"``, or
            PyTorch ``nn.Linear``'s ``(n_out, n_in)`` for ``layout="out_in"``.
            A host array, a device array (split where it lies, no host round
            trip) or any DLPack array such as a ``torch.Tensor``.
        bias : array, None or False
            The full ``(n_out,)`` bias. ``None`` sets the bias to zero (it
            still trains). A layer built with ``bias=False`` has no bias: it
            takes ``None`` or ``False``, and refuses an array (ConfigError).
        layout : {"in_out", "out_in"}, optional
            ``None`` (the default) is ``"in_out"`` for arrays; a ``torch.Tensor``
            weight needs it given (ConfigError otherwise), since a square
            ``nn.Linear.weight`` would otherwise load transposed without a word.

        Values are cast to the layer's dtype. Shapes are checked first
        (:class:`ShapeError`, :class:`ConfigError` for a bad ``layout``), and
        nothing changes unless everything is valid. ``full_weight()`` and
        ``full_bias()`` give back exactly what was loaded (in ``in_out``).
        """
        self.load_state_dict(self.dense_state(weight, bias, layout))
