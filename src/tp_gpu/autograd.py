"""The tape: :class:`Function` records what it computed, ``backward`` replays it in reverse.

As in Chainer's ``FunctionNode`` and PyTorch's ``autograd.Function``, a
function is a ``forward(ctx, *inputs)`` beside its ``backward(ctx, *grads)``.
``Function.apply`` runs ``forward`` and, when some input requires a gradient
and recording is on, links a :class:`Node` to the outputs: the function, its
``ctx`` (what ``forward`` kept for ``backward``) and one edge per input to the
node or leaf that produced it. ``loss.backward()`` walks the nodes reachable
from ``loss`` in reverse topological order: each node's ``backward`` turns the
gradients of its outputs into those of its inputs (the chain rule
``dL/dx = sum_y dL/dy * dy/dx``), gradients reaching one value by several
paths are summed, and leaves (parameters, ``tensor(..., requires_grad=True)``)
accumulate theirs. Each node's ``ctx`` is released once it has run, so a
second backward through the same graph raises, as PyTorch's does without
``retain_graph``.

A graph belongs to the call that built it: two threads running one module
build two graphs, and a module called twice in one step adds two nodes whose
parameter gradients sum. Inside ``with no_grad():`` nothing is recorded and
``ctx`` is dropped as soon as ``forward`` returns, so no activation is kept.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type, TypeVar, Union

from . import device_checks
from .errors import ShapeError, TensorParallelError
from .gradients import add_gradients, root_gradient
from .placements import Dense
from .tensor import Tensor

__all__ = [
    "Function",
    "Context",
    "FunctionContext",
    "Node",
    "no_grad",
    "enable_grad",
    "is_grad_enabled",
    "run_backward",
]


class _Mode(threading.local):
    """This thread's recording switch (on unless inside ``no_grad``)."""

    enabled = True


_mode = _Mode()

F = TypeVar("F", bound=Callable[..., Any])


def is_grad_enabled() -> bool:
    """Whether functions called on this thread now are recorded on the tape."""
    return _mode.enabled


class _GradMode:
    """A context manager (and decorator) setting this thread's recording to ``enabled``."""

    enabled = True

    def __enter__(self) -> None:
        self._previous = is_grad_enabled()
        _mode.enabled = self.enabled

    def __exit__(self, *exc: object) -> None:
        _mode.enabled = self._previous

    def __call__(self, fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with type(self)():
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


class no_grad(_GradMode):
    """``with tp_gpu.no_grad():``: record nothing and keep no activation (inference)."""

    enabled = False


class enable_grad(_GradMode):
    """``with tp_gpu.enable_grad():``: record again inside a ``no_grad`` block."""

    enabled = True


class Context:
    """What a function's ``forward`` keeps for its ``backward``.

    Library functions subclass it with ``__slots__`` naming their typed
    attributes, so a misspelt attribute fails in ``forward``, not in
    ``backward``. ``needs_input_grad[i]`` says whether input ``i`` wants a gradient.
    """

    __slots__ = ("needs_input_grad", "_saved")

    needs_input_grad: Tuple[bool, ...]
    _saved: Tuple[Any, ...]

    def save_for_backward(self, *tensors: Optional[Tensor]) -> None:
        """Keep ``tensors`` for ``backward`` (read back as :attr:`saved_tensors`).

        A tensor that can rebuild itself (the sequence all-gather's output, see
        :func:`tp_gpu.regions.gather_from_sequence_parallel_region`) is kept as
        its rebuild recipe, which holds ``1/p`` of it: the whole is gathered
        again when ``backward`` reads it, as Megatron-core does.
        """
        if len(tensors) == 1 and (tensors[0] is None or tensors[0].recompute is None):
            self._saved = tensors
        elif all(t is None or t.recompute is None for t in tensors):
            self._saved = tensors
        else:
            self._saved = tuple(t if t is None or t.recompute is None else _Rebuild(t) for t in tensors)

    @property
    def saved_tensors(self) -> Tuple[Any, ...]:
        """What :meth:`save_for_backward` kept (rebuilt where it kept a recipe)."""
        if not hasattr(self, "_saved"):
            return ()
        return tuple(t.rebuild() if isinstance(t, _Rebuild) else t for t in self._saved)


class FunctionContext(Context):
    """The context of a user's :class:`Function`: takes any attribute (``ctx.scale = 2.0``), as PyTorch's."""

    __dict__: Dict[str, Any]


class _Rebuild:
    """A saved tensor kept as the recipe that rebuilds it (its blocks are not held)."""

    __slots__ = ("recompute",)

    def __init__(self, tensor: Tensor) -> None:
        assert tensor.recompute is not None
        self.recompute: Callable[[], Tensor] = tensor.recompute

    def rebuild(self) -> Tensor:
        return self.recompute()


#: Where an input's gradient goes: the producing node and its output index, or a leaf tensor; and
#: the input's shape, which the gradient must have.
Edge = Tuple[Union["Node", Tensor], int, Tuple[int, ...]]


class Node:
    """One recorded call: the function, its context, and an edge (or None) per input."""

    __slots__ = ("function", "ctx", "edges", "n_outputs", "__weakref__")

    def __init__(
        self, function: Type[Function], ctx: Context, edges: List[Optional[Edge]], n_outputs: int
    ) -> None:
        self.function = function
        self.ctx: Optional[Context] = ctx
        self.edges = edges
        self.n_outputs = n_outputs

    @property
    def name(self) -> str:
        return f"{self.function.__name__}Backward"

    def __repr__(self) -> str:
        return f"<{self.name}>"


C = TypeVar("C", bound=Context)


class Function:
    """Base of a differentiable operation: subclass it with two static methods.

    ``forward(ctx, *args)`` computes the outputs (a Tensor or a tuple of
    Tensors; a function of ``Dense`` inputs may return raw arrays, placed like
    its first tensor input) and keeps on ``ctx`` what ``backward`` needs.
    ``backward(ctx, *grads)`` gets one gradient per output (None where no
    gradient reached it) and returns one per argument of ``forward`` (None for
    a non-tensor or where none is needed), each of its input's shape. Both run
    with recording off. Call it as ``MyFunction.apply(*args)``; check its
    ``backward`` with :func:`tp_gpu.testing.gradcheck`.

    ``ctx_class`` picks the context: :class:`FunctionContext` (any attribute)
    by default, a ``__slots__`` subclass of :class:`Context` for typed attributes.
    """

    ctx_class: ClassVar[Type[Context]] = FunctionContext

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method in ("forward", "backward"):
            if not isinstance(cls.__dict__.get(method, staticmethod(len)), staticmethod):
                raise TensorParallelError(f"{cls.__name__}.{method} must be a @staticmethod, as in PyTorch")

    @classmethod
    def apply(cls, *args: Any) -> Any:
        """Run ``forward`` on ``args``; record it when an input requires grad and recording is on."""
        mode = _mode
        enabled = mode.enabled
        ctx = cls.ctx_class()
        needs: Tuple[bool, ...] = ()
        if enabled:
            needs = tuple([isinstance(a, Tensor) and a.requires_grad for a in args])
            if True not in needs:
                needs = ()
        record = bool(needs)
        ctx.needs_input_grad = needs
        mode.enabled = False
        try:
            outputs = cls.forward(ctx, *args)  # type: ignore[attr-defined]
        finally:
            mode.enabled = enabled
        if isinstance(outputs, Tensor):
            if record:
                outputs.grad_fn = Node(cls, ctx, _edges(args), 1)
                outputs.requires_grad = True
            return outputs
        single = not isinstance(outputs, tuple)
        outs = tuple(
            o if isinstance(o, Tensor) else _wrap_output(o, args, cls)
            for o in ((outputs,) if single else outputs)
        )
        if record:
            node = Node(cls, ctx, _edges(args), len(outs))
            for i, o in enumerate(outs):
                o.grad_fn, o.output_nr, o.requires_grad = node, i, True
        return outs[0] if single else outs


def _edges(args: Tuple[Any, ...]) -> List[Optional[Edge]]:
    """Where each argument's gradient goes: its producer (or itself, a leaf) and its shape."""
    return [
        (a if a.grad_fn is None else a.grad_fn, a.output_nr, a.shape)
        if isinstance(a, Tensor) and a.requires_grad
        else None
        for a in args
    ]


def _first_tensor(args: Tuple[Any, ...]) -> Optional[Tensor]:
    return next((a for a in args if isinstance(a, Tensor)), None)


def _wrap_output(value: Any, args: Tuple[Any, ...], function: type) -> Tensor:
    """A raw array that ``forward`` (or ``backward``) returned, placed like the first tensor of ``args``
    (its inputs, or its output gradients), which must be Dense."""
    like = _first_tensor(args)
    if like is None or not isinstance(like.placement, Dense):
        raise TensorParallelError(
            f"{function.__name__} gave a {type(value).__name__}; expected a Tensor (a raw array "
            f"is placed only beside a Dense tensor, got {like!r})"
        )
    device = like.placement.device
    return Tensor({device: value}, like.placement, tuple(value.shape), value.dtype, like.backend, like.comm)


def _wrap_grad(value: Any, outputs: List[Optional[Tensor]], node: Node, index: int) -> Tensor:
    """A gradient returned by ``backward``, checked to have its input's shape; a raw array is placed
    like the first output gradient (which must be Dense)."""
    edge = node.edges[index]
    assert edge is not None
    got, expected = tuple(value.shape), edge[2]
    if got != expected:
        raise ShapeError(
            f"{node.function.__name__}.backward returned a gradient of shape {got} for input {index}; "
            f"expected the input's shape {expected}"
        )
    if isinstance(value, Tensor):
        return value
    return _wrap_output(value, tuple(outputs), node.function)


def run_backward(root: Tensor, grad: Any, retain_graph: bool = False) -> None:
    """Accumulate ``d(root)/d(leaf) * grad`` into every leaf reachable from ``root``.

    Everything that can be checked is checked before any node runs: ``grad``'s
    shape, and that no node of the graph was already released by an earlier
    backward. A failed call leaves the graph as it was, so a corrected call works.
    """
    if root.checks or device_checks.has_pending():
        device_checks.verify_all(root.checks)  # a bad id checked on a device raises before anything runs
    if not root.requires_grad:
        raise TensorParallelError(
            f"backward on a tensor that does not require grad ({root!r}): no input of the computation "
            "required a gradient, or it ran inside no_grad()"
        )
    seed = root_gradient(root, grad)
    start = root.grad_fn
    if start is None:
        root.accumulate_grad(seed)
        return
    pending_inputs = _count_dependencies(start)
    grads: Dict[Node, List[Optional[Tensor]]] = {start: [None] * start.n_outputs}
    grads[start][root.output_nr] = seed
    ready = [start]
    while ready:
        node = ready.pop()
        outputs = grads.pop(node)
        inputs = _node_backward(node, outputs) if any(g is not None for g in outputs) else ()
        if not retain_graph:
            node.ctx = None
        for index, edge in enumerate(node.edges):
            if edge is None:
                continue
            target = edge[0]
            g = inputs[index] if index < len(inputs) else None
            if isinstance(target, Node):
                if g is not None:
                    slot = grads.setdefault(target, [None] * target.n_outputs)
                    earlier = slot[edge[1]]
                    slot[edge[1]] = g if earlier is None else add_gradients(earlier, g)
                pending_inputs[target] -= 1
                if pending_inputs[target] == 0:
                    grads.setdefault(target, [None] * target.n_outputs)
                    ready.append(target)
            elif g is not None:
                target.accumulate_grad(g)


def _count_dependencies(start: Node) -> Dict[Node, int]:
    """How many edges lead into each node reachable from ``start``; raises if one was released."""
    counts: Dict[Node, int] = {}
    stack = [start]
    seen = {start}
    while stack:
        node = stack.pop()
        if node.ctx is None:
            raise TensorParallelError(
                f"backward through {node.name} a second time: its saved values were freed by the first "
                "backward; call backward(retain_graph=True) the first time to keep them"
            )
        for edge in node.edges:
            if edge is not None and isinstance(edge[0], Node):
                child = edge[0]
                counts[child] = counts.get(child, 0) + 1
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    return counts


def _node_backward(node: Node, outputs: List[Optional[Tensor]]) -> Tuple[Optional[Tensor], ...]:
    """``node.function.backward(ctx, *outputs)``, recording off, its gradients checked."""
    previous = _mode.enabled
    _mode.enabled = False
    try:
        result = node.function.backward(node.ctx, *outputs)  # type: ignore[attr-defined]
    finally:
        _mode.enabled = previous
    result = result if isinstance(result, tuple) else (result,)
    if len(result) != len(node.edges):
        raise TensorParallelError(
            f"{node.function.__name__}.backward returned {len(result)} gradients; expected "
            f"{len(node.edges)}, one per argument of forward (None for those without one)"
        )
    return tuple(
        None if g is None or node.edges[i] is None else _wrap_grad(g, outputs, node, i)
        for i, g in enumerate(result)
    )
