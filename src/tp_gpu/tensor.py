"""Tensor: the value that flows between modules, knowing where it lives and what produced it.

A :class:`Tensor` holds one block per device and a placement
(:mod:`tp_gpu.placements`) saying how the blocks make the logical value:
whole on one device, a copy on each, split along an axis, or partial sums.
It also holds its logical shape and dtype and, when it was computed with
gradients recorded, the node of the tape that produced it (``grad_fn``).

``np.asarray(t)`` and ``t.numpy()`` give a host copy of the logical value
(a split tensor gathered, partial sums added), ``float(t)`` a scalar's value.
``+ - * /`` run per device between tensors of equal placement, with no copy
(:mod:`tp_gpu.ops`); ``t.backward()`` runs the tape (:mod:`tp_gpu.autograd`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Hashable, List, Optional, Tuple, Type

import numpy as np

from . import collectives, device_checks
from .backends.base import Backend, as_array, host_array, is_cupy_array
from .comm.base import Communicator, LocalComm
from .errors import ShapeError
from .placements import HOST, Dense, Partial, Placement, Split

if TYPE_CHECKING:
    from .autograd import Node
    from .device_checks import DeferredCheck

__all__ = ["Tensor", "Blocks", "tensor", "new_tensor", "device_of_array"]

Blocks = Dict[Hashable, Any]

_LOCAL = LocalComm()

#: Guards leaves' ``grad`` against two threads' backward passes adding at once (parameters have
#: their own lock). A leaf made lazily per tensor could be made twice by two threads.
_LEAF_GRAD_LOCK = threading.Lock()


def device_of_array(x: Any) -> Hashable:
    """The device of a raw array that no backend has claimed: a CuPy array's GPU id, else :data:`HOST`."""
    return int(x.device.id) if type(x) is not np.ndarray and is_cupy_array(x) else HOST


#: :mod:`tp_gpu.ops`' functions by name, filled on first use (``ops`` imports this module, so it
#: cannot be imported at the top; an import inside each operator call would cost 0.5 µs a call).
_OPS: Dict[str, Callable[..., Tensor]] = {}


def _load_op(name: str) -> Callable[..., Tensor]:
    from . import ops

    fn = _OPS[name] = getattr(ops, name)
    return fn


def _arithmetic(name: str, reflected: bool = False) -> Callable[[Tensor, Any], Tensor]:
    """The operator method ``self <op> other`` (``other <op> self`` when ``reflected``): :mod:`tp_gpu.ops`'
    function ``name``, which runs per device and records itself."""

    def method(self: Tensor, other: Any) -> Tensor:
        fn = _OPS.get(name) or _load_op(name)
        return fn(other, self) if reflected else fn(self, other)

    method.__name__ = f"__{'r' if reflected else ''}{name if name != 'div' else 'truediv'}__"
    return method


class Tensor:
    """A logical array of ``shape`` and ``dtype``, kept as ``blocks`` placed as ``placement``.

    Build one from data with :func:`tp_gpu.tensor`; layers and regions build
    theirs from blocks. ``backend`` owns the blocks (None for a host array
    not yet placed); ``comm`` spans the processes of a multi-process group.

    Attributes
    ----------
    grad_fn : Node or None
        The tape node that produced this tensor (None for a leaf or without recording).
    requires_grad : bool
        Whether gradients flow to this tensor.
    grad : Tensor or None
        For a leaf that requires grad: the accumulated gradient after ``backward``.
    """

    __slots__ = (
        "blocks",
        "placement",
        "shape",
        "dtype",
        "backend",
        "comm",
        "grad_fn",
        "output_nr",
        "requires_grad",
        "grad",
        "recompute",
        "checks",
        "__weakref__",
    )

    def __init__(
        self,
        blocks: Blocks,
        placement: Placement,
        shape: Tuple[int, ...],
        dtype: Any,
        backend: Optional[Backend],
        comm: Optional[Communicator] = None,
        requires_grad: bool = False,
    ) -> None:
        self.blocks = blocks
        self.placement = placement
        self.shape = shape
        self.dtype = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
        self.backend = backend
        self.comm: Communicator = _LOCAL if comm is None else comm
        self.grad_fn: Optional[Node] = None
        self.output_nr = 0
        self.requires_grad = requires_grad
        self.grad: Optional[Tensor] = None
        #: Set by the sequence all-gather: rebuilds the blocks from the slices it kept (see
        #: :meth:`tp_gpu.autograd.Context.save_for_backward`).
        self.recompute: Optional[Callable[[], Tensor]] = None
        #: Device-side checks of the values this tensor was computed from (:mod:`tp_gpu.device_checks`),
        #: read before a host copy or a backward.
        self.checks: Tuple[DeferredCheck, ...] = ()

    # ------------------------------------------------------------------ what it is

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements of the logical value."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def is_leaf(self) -> bool:
        return self.grad_fn is None

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        grad = f", grad_fn={self.grad_fn.name}" if self.grad_fn is not None else ""
        grad += ", requires_grad=True" if self.requires_grad and self.grad_fn is None else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, placement={self.placement!r}{grad})"

    # ------------------------------------------------------------------ to the host

    def numpy(self) -> np.ndarray:
        """The logical value as a host NumPy array (collective with several processes, except ``Dense``).

        Device-side checks waiting to be read (a bad token id) raise here first.
        """
        if self.checks or device_checks.has_pending():
            device_checks.verify_all(self.checks)
        p = self.placement
        if isinstance(p, Split):
            assert self.backend is not None
            return collectives.gather_to_host(self.backend, self.blocks, p.axis, p.layout, self.comm)
        if isinstance(p, Partial):
            assert self.backend is not None
            total = collectives.reduce_sum(self.backend, dict(self.blocks), p.devices[0], self.comm)
            return np.array(host_array(total))
        first = next(iter(self.blocks.values()))
        return np.asarray(
            host_array(first) if self.backend is None else collectives.to_host(self.backend, first)
        )

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        out = self.numpy()
        return out if dtype is None else out.astype(dtype, copy=False)

    def item(self) -> float:
        if self.size != 1:
            raise ShapeError(f"item() needs a tensor of one element, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def __float__(self) -> float:
        return float(self.item())

    def tolist(self) -> Any:
        return self.numpy().tolist()

    # ------------------------------------------------------------------ the tape

    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Accumulate ``d(self)/d(leaf) * grad`` into every leaf's gradient (parameters' too).

        ``grad`` is the gradient of this tensor: omitted for a scalar (1), else
        an array of this tensor's shape (placed like it) or a Tensor. The graph
        is freed afterwards unless ``retain_graph``: a second backward raises.
        """
        from .autograd import run_backward

        run_backward(self, grad, retain_graph)

    def detach(self) -> Tensor:
        """The same blocks, cut from the tape: no ``grad_fn``, no gradient."""
        return new_tensor(self.blocks, self.placement, self.shape, self.dtype, self.backend, self.comm)

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        """Mark a leaf as needing its gradient (``t.grad`` after ``backward``)."""
        self.requires_grad = bool(requires_grad)
        return self

    def accumulate_grad(self, grad: Tensor) -> None:
        """Add ``grad`` to ``self.grad`` (a leaf's gradient); safe from several threads."""
        from .gradients import add_gradients

        with _LEAF_GRAD_LOCK:
            self.grad = grad if self.grad is None else add_gradients(self.grad, grad)

    # ------------------------------------------------------------------ arithmetic (tp_gpu.ops)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        """``array + tensor`` (``- * /`` too) is the tensor operation, recorded; any other NumPy ufunc
        of a tensor works on its host copy, as for any object with ``__array__``."""
        from .ops import ELEMENTWISE_UFUNCS, elementwise

        op = ELEMENTWISE_UFUNCS.get(ufunc)
        if method == "__call__" and op is not None and len(inputs) == 2 and not kwargs:
            return elementwise(inputs[0], inputs[1], op)
        hosts = tuple(x.numpy() if isinstance(x, Tensor) else x for x in inputs)
        return getattr(ufunc, method)(*hosts, **kwargs)

    __add__ = _arithmetic("add")
    __radd__ = _arithmetic("add", reflected=True)
    __sub__ = _arithmetic("sub")
    __rsub__ = _arithmetic("sub", reflected=True)
    __mul__ = _arithmetic("mul")
    __rmul__ = _arithmetic("mul", reflected=True)
    __truediv__ = _arithmetic("div")
    __rtruediv__ = _arithmetic("div", reflected=True)

    def __neg__(self) -> Tensor:
        from .ops import mul

        return mul(self, -1)

    def __getitem__(self, index: Any) -> Tensor:
        from .shape_ops import getitem

        return getitem(self, index)

    def reshape(self, *shape: Any) -> Tensor:
        """The same values in ``shape`` (``Dense``, ``Replicated`` or ``Partial`` tensors)."""
        from .shape_ops import reshape

        return reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)

    def transpose(self, *axes: int) -> Tensor:
        """Axes permuted (reversed when none are given); a split axis moves with its data."""
        from .shape_ops import transpose

        return transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], tuple) else axes)

    def sum(self) -> Tensor:
        """The sum of every element, a scalar ``Dense`` tensor."""
        from .ops import total

        return total(self)

    def mean(self) -> Tensor:
        """The mean of every element, a scalar ``Dense`` tensor."""
        from .ops import total

        return total(self) / max(self.size, 1)


#: The class of split tensors (:class:`~tp_gpu.ShardedTensor`, registered by :mod:`tp_gpu.sharded`).
SPLIT_CLASS: List[Type[Tensor]] = [Tensor]


def new_tensor(
    blocks: Blocks,
    placement: Placement,
    shape: Tuple[int, ...],
    dtype: Any,
    backend: Optional[Backend],
    comm: Optional[Communicator] = None,
) -> Tensor:
    """A tensor of ``blocks``: a :class:`~tp_gpu.ShardedTensor` when ``placement`` is ``Split``."""
    cls = SPLIT_CLASS[0] if isinstance(placement, Split) else Tensor
    out = cls.__new__(cls)
    Tensor.__init__(out, blocks, placement, shape, dtype, backend, comm)
    return out


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """A ``Dense`` leaf tensor of ``data`` where it lies: a host array (NumPy, lists, a CPU
    ``torch.Tensor`` through DLPack) or a CuPy array on its GPU. Layers move it where they need it.

    ``requires_grad=True`` makes ``t.grad`` hold its gradient after ``backward``.
    """
    if isinstance(data, Tensor):
        data = data.numpy()
    try:
        array = as_array(data)
    except (ValueError, TypeError) as exc:
        raise ShapeError(f"tp_gpu.tensor could not read {type(data).__name__} as an array ({exc})") from exc
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    device = device_of_array(array)
    return Tensor({device: array}, Dense(device), tuple(array.shape), array.dtype, None, None, requires_grad)
