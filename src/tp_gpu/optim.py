"""Optimizers that update every parameter in place, each device block on its own device.

Each optimizer takes the parameters of one or more modules (``model.parameters()``)
and keeps its state (momentum, Adam moments, step counts) block by block,
beside the block. Updates follow PyTorch's definitions, so a tensor-parallel
model and its dense twin take the same steps.

Float16 parameters train with float32 *master weights*: the optimizer keeps a
float32 copy of each block, updates it in float32 from the widened gradient,
and rounds it back into the float16 block that the layers compute with (as
mixed-precision training does; ``torch.optim`` under AMP keeps float32 state).

:meth:`Optimizer.state_dict` holds every state tensor as its *logical*
(unsharded) value, so it loads into an optimizer over the same model split any
other way; :func:`tp_gpu.save_checkpoint` stores it beside the weights.

Global-norm clipping lives in :mod:`tp_gpu.clip`; ``clip_grad_norm`` is importable from here too.
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Any, Dict, Hashable, Iterable, Iterator, List, Mapping, Tuple

import numpy as np

from . import collectives
from .clip import clip_grad_norm
from .errors import ConfigError, ShapeError
from .parameter import ShardedParameter

__all__ = ["Optimizer", "SGD", "Adam", "clip_grad_norm"]

BlockState = Dict[str, Any]


def _check_params(params: Iterable[ShardedParameter]) -> List[ShardedParameter]:
    params = list(params)
    if not params:
        raise ConfigError("the optimizer got no parameters; pass module.parameters()")
    for p in params:
        if not isinstance(p, ShardedParameter):
            raise ConfigError(
                f"optimizer parameters must be ShardedParameter objects, got {type(p).__name__}"
            )
    if len({id(p) for p in params}) != len(params):
        raise ConfigError("a parameter appears more than once in the optimizer's parameter list")
    return params


def _check_number(value: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a float when it is a finite real number in ``[low, high)`` (``(low, high)`` with
    ``low_open``), else ConfigError naming the value and the interval."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value < high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must be a number in {bracket}{low}, {high}), got {value!r}")
    return float(value)


class Optimizer:
    """Base of the optimizers: per-block state, master weights for float16, logical state dicts.

    Subclasses define ``STATE_KEYS`` (the names of their per-element state
    tensors) and ``_update(weight, grad, state, xp)``, which updates the float32
    or float64 ``weight`` in place and fills ``state``.
    """

    STATE_KEYS: Tuple[str, ...] = ()

    def __init__(self, params: Iterable[ShardedParameter]) -> None:
        self.params = _check_params(params)
        #: Per parameter, per device block: ``{"step": int, <STATE_KEYS>: array, "master": array}``.
        self._state: List[Dict[Hashable, BlockState]] = [{d: {} for d in p.blocks} for p in self.params]

    def zero_grad(self) -> None:
        """Forget the gradients of every parameter."""
        for p in self.params:
            p.zero_grad()

    def step(self) -> None:
        """Update every block that has a gradient, in place, under its device."""
        for p, states in zip(self.params, self._state):
            keys = [d for d, g in p.grad_blocks.items() if g is not None]
            update = partial(self._update_block, p.backend.xp)
            collectives.on_devices(p.backend, update, p.blocks, p.grad_blocks, states, keys=keys)

    def _update_block(self, xp: Any, block: Any, grad: Any, state: BlockState) -> None:
        state["step"] = state.get("step", 0) + 1
        if block.dtype.itemsize >= 4:
            self._update(block, grad, state, xp)
            return
        if "master" not in state:
            state["master"] = block.astype(np.float32)
        self._update(state["master"], grad.astype(np.float32), state, xp)
        block[...] = state["master"]  # rounded into the float16 compute copy

    def _update(self, weight: Any, grad: Any, state: BlockState, xp: Any) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ settings

    @classmethod
    def check_hyperparameters(cls, **settings: Any) -> Dict[str, Any]:
        """The settings (``lr``, ...) checked and normalised, or ConfigError naming the bad one.

        The constructor and :meth:`load_state_dict` both go through this one check.
        """
        raise NotImplementedError

    def _set_hyperparameters(self, settings: Mapping[str, Any]) -> None:
        """Install settings returned by :meth:`check_hyperparameters`."""
        for key, value in settings.items():
            setattr(self, key, value)

    def hyperparameters(self) -> Dict[str, Any]:
        """The optimizer's settings (``lr``, ...), as ``param_groups[0]`` of a state dict."""
        raise NotImplementedError

    def _settings_of(self, state_dict: Mapping[str, Any]) -> Dict[str, Any]:
        """``state_dict``'s ``param_groups[0]`` over the current settings, checked as the constructor
        checks them (keys this optimizer does not have are ignored, as torch keeps them unused)."""
        groups = state_dict.get("param_groups", [{}])
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
            raise ShapeError(
                f"optimizer state dict 'param_groups' must be a list of dicts of settings, got {groups!r}"
            )
        given = dict(groups[0]) if groups else {}
        current = self.hyperparameters()
        merged = {**current, **{k: v for k, v in given.items() if k in current}}
        try:
            return self.check_hyperparameters(**merged)
        except ConfigError as exc:
            raise ConfigError(f"optimizer state dict param_groups[0]: {exc}") from None

    # ------------------------------------------------------------------ state dicts

    def state_dict(self) -> Dict[str, Any]:
        """``{"state": {i: {"step": int, key: logical array}}, "param_groups": [settings]}``, as torch.

        ``i`` is the parameter's position in the optimizer's list; arrays are
        new host arrays of the parameter's logical shape. With several
        processes this is collective.
        """
        state: Dict[int, Dict[str, Any]] = {}
        for i, (p, blocks) in enumerate(zip(self.params, self._state)):
            steps = {b.get("step", 0) for b in blocks.values()}
            if steps == {0}:
                continue
            entry: Dict[str, Any] = {"step": max(steps)}
            for key in self.STATE_KEYS + (("master",) if "master" in next(iter(blocks.values())) else ()):
                entry[key] = p.assemble(
                    {d: b[key] if key in b else _zeros_like(p, d) for d, b in blocks.items()}
                )
            state[i] = entry
        return {"state": state, "param_groups": [self.hyperparameters()]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (from this or any other split of the same model).

        Everything is checked (indices, keys, shapes, and the settings with the
        constructor's own check) and staged on the devices before anything
        changes: on an error the optimizer is left as it was.
        """
        self.commit_state_dict(state_dict, self.stage_state_dict(state_dict))

    def commit_state_dict(
        self, state_dict: Mapping[str, Any], staged: Dict[int, Dict[Hashable, BlockState]]
    ) -> None:
        """Install state made by :meth:`stage_state_dict` (and ``state_dict``'s settings)."""
        self._set_hyperparameters(self._settings_of(state_dict))  # checked by the stage already
        self._state = [{d: {} for d in p.blocks} for p in self.params]  # replaced whole, as torch.optim
        for i, blocks in staged.items():
            self._state[i] = blocks

    def stage_state_dict(self, state_dict: Mapping[str, Any]) -> Dict[int, Dict[Hashable, BlockState]]:
        """Every parameter's state checked and placed on its devices, without touching the optimizer."""
        if not isinstance(state_dict, Mapping) or "state" not in state_dict:
            kind = type(state_dict).__name__
            raise ShapeError(f"optimizer state dict must be a mapping with a 'state' entry, got {kind}")
        self._settings_of(state_dict)  # ConfigError before anything changes
        if not isinstance(state_dict["state"], Mapping):
            kind = type(state_dict["state"]).__name__
            raise ShapeError(f"optimizer state dict 'state' must map parameter index to state, got {kind}")
        staged: Dict[int, Dict[Hashable, BlockState]] = {}
        for i, entry in state_dict["state"].items():
            if not isinstance(i, (int, np.integer)) or not 0 <= int(i) < len(self.params):
                last = len(self.params) - 1
                raise ShapeError(f"optimizer state for parameter {i!r}; expected indices 0..{last}")
            staged[int(i)] = self._stage_entry(int(i), entry)
        return staged

    def _stage_entry(self, i: int, entry: Mapping[str, Any]) -> Dict[Hashable, BlockState]:
        """Parameter ``i``'s state ``entry`` (``step`` and logical arrays) as per-block state."""
        expected = ("step",) + self.STATE_KEYS
        missing = [k for k in expected if k not in entry]
        if missing:
            raise ShapeError(f"optimizer state of parameter {i} misses {missing}; expected {expected}")
        p = self.params[i]
        arrays = {}
        for key, value in entry.items():
            if key != "step":
                dtype = np.float32 if key == "master" else _state_dtype(p)
                arrays[key] = p.stage(value, f"optimizer state {key!r} of parameter {i}", dtype=dtype)
        return {d: {"step": int(entry["step"]), **{k: a[d] for k, a in arrays.items()}} for d in p.blocks}


def _state_dtype(p: ShardedParameter) -> np.dtype:
    """Optimizer state is kept in float32 for float16 parameters, else in the parameter's dtype."""
    return np.dtype(np.float32) if p.dtype.itemsize < 4 else p.dtype


def _zeros_like(p: ShardedParameter, device: Hashable) -> Any:
    with p.backend.device(device):
        return p.backend.xp.zeros(p.blocks[device].shape, dtype=_state_dtype(p))


class SGD(Optimizer):
    """Stochastic gradient descent with optional (heavy-ball) momentum, as ``torch.optim.SGD``.

    ``v <- momentum * v + g`` (``v = g`` on the first step), ``w <- w - lr * v``.
    """

    STATE_KEYS: Tuple[str, ...] = ("momentum_buffer",)
    lr: float
    momentum: float

    def __init__(self, params: Iterable[ShardedParameter], lr: float, momentum: float = 0.0) -> None:
        self._set_hyperparameters(self.check_hyperparameters(lr=lr, momentum=momentum))
        super().__init__(params)

    @classmethod
    def check_hyperparameters(cls, **settings: Any) -> Dict[str, Any]:
        """``lr`` in (0, inf), ``momentum`` in [0, 1)."""
        return {
            "lr": _check_number(settings.get("lr"), "lr", 0.0, math.inf, low_open=True),
            "momentum": _check_number(settings.get("momentum", 0.0), "momentum", 0.0, 1.0),
        }

    def _set_hyperparameters(self, settings: Mapping[str, Any]) -> None:
        super()._set_hyperparameters(settings)
        self.STATE_KEYS = ("momentum_buffer",) if self.momentum else ()

    def hyperparameters(self) -> Dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum}

    def _update(self, weight: Any, grad: Any, state: BlockState, xp: Any) -> None:
        velocity = state.get("momentum_buffer") if self.momentum else None
        if self.momentum and velocity is None:
            state["momentum_buffer"] = grad.copy()  # v = g on the first step: the update reads g
        arrays = (weight, grad) if velocity is None else (weight, grad, velocity)
        for w, g, *v, s in _pieces(xp, arrays):
            if v:  # v = momentum v + g, then the update reads v
                v[0] *= self.momentum
                v[0] += g
                g = v[0]
            xp.multiply(g, self.lr, out=s)
            w -= s


class Adam(Optimizer):
    """Adam (Kingma and Ba, 2015), as ``torch.optim.Adam`` without weight decay.

    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``w <- w - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)``, where
    ``t`` counts the steps in which that parameter had a gradient (as in
    PyTorch). Every operation writes into ``m``, ``v``, the weight or one
    scratch array (see :func:`adam_update`): on the host, one pass through
    memory per device block.
    """

    STATE_KEYS = ("exp_avg", "exp_avg_sq")
    lr: float
    betas: Tuple[float, float]
    eps: float

    def __init__(
        self,
        params: Iterable[ShardedParameter],
        lr: float,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self._set_hyperparameters(self.check_hyperparameters(lr=lr, betas=betas, eps=eps))
        super().__init__(params)

    @classmethod
    def check_hyperparameters(cls, **settings: Any) -> Dict[str, Any]:
        """``lr`` in (0, inf), ``betas`` a pair in [0, 1), ``eps`` in (0, inf)."""
        betas = settings.get("betas", (0.9, 0.999))
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        return {
            "lr": _check_number(settings.get("lr"), "lr", 0.0, math.inf, low_open=True),
            "betas": (
                _check_number(betas[0], "betas[0]", 0.0, 1.0),
                _check_number(betas[1], "betas[1]", 0.0, 1.0),
            ),
            "eps": _check_number(settings.get("eps", 1e-8), "eps", 0.0, math.inf, low_open=True),
        }

    def hyperparameters(self) -> Dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps}

    def _update(self, weight: Any, grad: Any, state: BlockState, xp: Any) -> None:
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = xp.zeros_like(grad), xp.zeros_like(grad)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        adam_update(weight, grad, m, v, state["step"], self.lr, self.betas, self.eps, xp)


#: Host updates go through their arrays in pieces of this many bytes each, so that every array of a
#: piece stays in the CPU's cache across the update's operations: one trip through memory per array
#: instead of one per operation (2x faster than whole-array passes for Adam at 51M float32 numbers).
HOST_PIECE_BYTES = 256 * 1024


def _pieces(xp: Any, arrays: Tuple[Any, ...]) -> Iterator[Tuple[Any, ...]]:
    """``arrays`` (of one shape) in matching flat pieces, each followed by a scratch piece of the first's
    dtype: cache-sized pieces for C-contiguous host arrays, the whole arrays (and a whole scratch)
    otherwise (a GPU, whose kernels want whole arrays)."""
    host = all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays)
    if not host or arrays[0].nbytes <= HOST_PIECE_BYTES:
        yield (*arrays, xp.empty_like(arrays[0]))
        return
    flat = [a.reshape(-1) for a in arrays]  # views: C-contiguous
    size = max(1, HOST_PIECE_BYTES // arrays[0].itemsize)
    scratch = xp.empty(size, dtype=arrays[0].dtype)
    for start in range(0, flat[0].size, size):
        piece = tuple(f[start : start + size] for f in flat)
        yield (*piece, scratch[: piece[0].size])


def adam_update(
    weight: Any,
    grad: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    step: int,
    lr: float,
    betas: Tuple[float, float],
    eps: float,
    xp: Any,
) -> None:
    """One Adam step on arrays of one shape, in place: ``exp_avg`` (m), ``exp_avg_sq`` (v), ``weight``.

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2`` and
    ``w -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)``, computed as
    ``w -= (lr sqrt(1 - b2^t) / (1 - b1^t)) m / (sqrt(v) + eps sqrt(1 - b2^t))``. Every operation
    writes into ``m``, ``v``, ``w`` or one scratch array; on the host they run piece by piece
    (:data:`HOST_PIECE_BYTES`), so that the step makes one pass through memory.
    """
    b1, b2 = betas
    root = math.sqrt(1.0 - b2**step)
    step_size = lr * root / (1.0 - b1**step)
    for w, g, m, v, s in _pieces(xp, (weight, grad, exp_avg, exp_avg_sq)):
        xp.multiply(g, 1.0 - b1, out=s)
        m *= b1
        m += s  # m = b1 m + (1 - b1) g
        xp.multiply(g, g, out=s)
        s *= 1.0 - b2
        v *= b2
        v += s  # v = b2 v + (1 - b2) g^2
        xp.sqrt(v, out=s)
        s += eps * root
        xp.divide(m, s, out=s)
        s *= step_size
        w -= s
