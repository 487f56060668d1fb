"""What every tensor-parallel layer shares: config, backend, placement, input checks."""

from __future__ import annotations

import numbers
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..backends import as_array, from_dlpack, get_backend, is_dlpack_array
from ..comm import get_communicator
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, ShapeError, TensorParallelError
from ..parameter import ShardedParameter
from ..partition import BlockLayout, check_divisible
from ..placement import worker_devices

__all__ = ["ParallelModule", "HasParameters", "as_array_like", "check_seed", "check_layout", "stage_state", "commit_state", "LAYOUTS"]


def check_seed(seed) -> int:
    """Return ``seed`` if it is a non-negative integer, else raise ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def as_array_like(x: Any, what: str) -> Any:
    """``x`` as something with ``.shape``/``.dtype``: arrays pass through, lists become NumPy.

    DLPack arrays (PyTorch tensors, JAX arrays) are imported without a copy:
    host memory as a NumPy array, GPU memory as a CuPy array on its GPU (see
    :func:`tp_gpu.backends.from_dlpack`), so a GPU tensor reaches the CuPy
    backend without a round trip through the host.
    """
    if is_dlpack_array(x):
        try:
            return from_dlpack(x)
        except ShapeError as exc:
            raise ShapeError(f"{what}: {exc}") from exc
    try:
        return as_array(x)
    except (ValueError, TypeError) as exc:
        raise ShapeError(f"{what} could not be read as a rectangular array ({exc}); got {type(x).__name__}") from exc


#: Weight layouts accepted by ``from_dense`` / ``load_dense``: ours, ``(n_in, n_out)``,
#: and PyTorch's ``nn.Linear``, ``(n_out, n_in)``.
LAYOUTS = ("in_out", "out_in")


def check_layout(layout: Any) -> str:
    """Return ``layout`` if it is one of :data:`LAYOUTS`, else raise ConfigError."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ConfigError(
            f"layout must be 'in_out' (weight of shape (n_in, n_out)) or 'out_in' "
            f"(PyTorch nn.Linear's (n_out, n_in)), got {layout!r}"
        )
    return layout


Staged = List[Tuple[ShardedParameter, Dict[Hashable, Any]]]


def stage_state(named: Sequence[Tuple[str, ShardedParameter]], state: Mapping[str, Any], what: str) -> Staged:
    """Check ``state`` against the parameters ``named`` and stage every value on its devices.

    Every key must be present and no other, and every value must pass
    :meth:`ShardedParameter.stage` (logical shape, real dtype), before
    anything is returned: a ShapeError here leaves every parameter as it was.
    Pass the result to :func:`commit_state`.
    """
    if not isinstance(state, Mapping):
        raise ShapeError(f"{what} expects a mapping of parameter name to array, got {type(state).__name__}")
    params = dict(named)
    missing = [name for name in params if name not in state]
    unexpected = [key for key in state if key not in params]
    if missing or unexpected:
        raise ShapeError(
            f"{what}: missing keys {missing}, unexpected keys {unexpected}; expected exactly {list(params)}"
        )
    return [(param, param.stage(state[name], f"{what}: {name!r}")) for name, param in params.items()]


def commit_state(staged: Staged) -> None:
    """Write values staged by :func:`stage_state` into their parameters, in place."""
    for param, blocks in staged:
        param.commit(blocks)


class HasParameters:
    """State-dict methods of anything that lists its parameters (the layers, ParallelMLP).

    Subclasses implement :meth:`named_parameters`.
    """

    def named_parameters(self) -> List[Tuple[str, ShardedParameter]]:
        """``(name, parameter)`` pairs in registration order; the names are the state-dict keys."""
        raise NotImplementedError

    def parameters(self) -> List[ShardedParameter]:
        """The parameters, in registration order (what the optimizers take)."""
        return [p for _, p in self.named_parameters()]

    def grads(self) -> Dict[str, np.ndarray]:
        """The accumulated gradients as dense host arrays, keyed like the state dict."""
        return {name: p.full_grad() for name, p in self.named_parameters()}

    def zero_grad(self) -> None:
        """Reset the accumulated gradients of every parameter."""
        for p in self.parameters():
            p.zero_grad()

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Every parameter's logical (dense, unsharded) value as a new host NumPy array, by name.

        The values do not depend on the worker count, placement or backend, so
        a state dict saved from one configuration loads into any other.
        """
        return {name: param.full() for name, param in self.named_parameters()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Set every parameter from its logical value in ``state_dict``, re-sharding it for this module.

        ``state_dict`` maps each name of :meth:`named_parameters` (no more, no
        fewer) to an array of that parameter's logical shape: a host array, a
        device array or any DLPack array. Values are cast to the module's dtype,
        as ``torch.nn.Module.load_state_dict`` does; they must hold real numbers.
        Everything is checked, and staged on the devices, before anything is
        written: on a ShapeError the module is left exactly as it was.
        Gradients and optimizer state are left alone.
        """
        commit_state(stage_state(self.named_parameters(), state_dict, f"{type(self).__name__}.load_state_dict"))


class ParallelModule(HasParameters):
    """Base of the layers: resolves the config, backend and worker placement.

    Subclasses call :meth:`_split_dim` to validate the split dimension before
    anything is allocated, then :meth:`_add_parameter` to shard each logical
    parameter. ``training`` (default True) makes ``forward`` keep what
    ``backward`` needs; :meth:`eval` turns that off for inference.
    """

    training: bool = True

    def __init__(self, config: Optional[TensorParallelConfig]) -> None:
        if config is None:
            config = TensorParallelConfig()
        if not isinstance(config, TensorParallelConfig):
            raise ConfigError(f"config must be a TensorParallelConfig or None, got {type(config).__name__}")
        self.config = config
        self.dtype = np.dtype(config.dtype)
        self._params: Dict[str, ShardedParameter] = {}
        self._saved: Optional[Dict[str, Any]] = None

    def _split_dim(self, size, what: str) -> int:
        size = check_positive_int(size, what)
        check_divisible(size, self.config.n_workers, what)
        return size

    def _init_placement(self, **fingerprint: Any) -> None:
        """Build the backend and place this process's workers (after every argument is validated).

        With several processes, this process (rank ``r`` of ``s``) holds the
        consecutive workers ``[r * p / s, (r + 1) * p / s)``, placed round-robin
        on its own devices. ``fingerprint`` (the constructor's arguments) must
        be the same on every process; a difference raises ConfigError on all.
        """
        self.comm = get_communicator(self.config.comm)
        self._check_same_on_every_rank(fingerprint)
        devices = self.config.devices
        if devices is None and self.comm.name == "nccl":
            devices = [self.comm.device]  # one GPU per process
        self.backend = get_backend(self.config.backend, devices)
        self._placement = worker_devices(self.config.n_workers // self.comm.size, self.backend.devices)
        out = self.config.output_device
        if out is None:
            out = self._placement[0]
        if out not in self.backend.devices:
            raise ConfigError(
                f"output_device {out!r} is not a device of the {self.backend.name} backend; "
                f"expected one of {list(self.backend.devices)}"
            )
        self.output_device: Hashable = out

    def _check_same_on_every_rank(self, fingerprint: Dict[str, Any]) -> None:
        if self.comm.size == 1:
            return
        mine = {"layer": type(self).__name__, "n_workers": self.config.n_workers, "dtype": self.config.dtype, **fingerprint}
        every = self.comm.allgather_object(mine)
        differing = sorted({key for other in every for key in set(other) | set(mine) if other.get(key) != mine.get(key)})
        if differing:
            values = "; ".join(f"rank {r}: " + ", ".join(f"{k}={every[r].get(k)!r}" for k in differing) for r in range(len(every)))
            raise ConfigError(
                f"{type(self).__name__} was built differently across the {self.comm.size} {self.comm.name} ranks "
                f"({values}); every rank must pass the same arguments"
            )

    def _even_layout(self, size: int) -> BlockLayout:
        """How a dimension of ``size``, split evenly over all workers, lies on this process's devices."""
        return BlockLayout.even(size, self._placement, rank=self.comm.rank, world_size=self.comm.size)

    def _add_parameter(self, name: str, full: np.ndarray, layout: Optional[BlockLayout] = None, axis: Optional[int] = None) -> ShardedParameter:
        """Register the host array ``full`` as parameter ``name``.

        Split along ``axis`` as ``layout`` says, or kept whole on the output
        device when ``axis`` is None.
        """
        param = ShardedParameter(name, full, axis, layout, self.output_device, self.backend, self.dtype, self.comm)
        self._params[name] = param
        return param

    def named_parameters(self) -> List[Tuple[str, ShardedParameter]]:
        """``(name, parameter)`` pairs in registration order, e.g. ``("weight", ...), ("bias", ...)``."""
        return list(self._params.items())

    def train(self, mode: bool = True) -> "ParallelModule":
        """Keep (``True``) or drop (``False``) the activations ``backward`` needs."""
        self.training = bool(mode)
        if not self.training:
            self._saved = None
        return self

    def eval(self) -> "ParallelModule":
        """Inference mode: ``forward`` keeps nothing for ``backward``."""
        return self.train(False)

    def _take_saved(self, what: str) -> Dict[str, Any]:
        """What the last training-mode ``forward`` kept, or a clear error if there is none."""
        if self._saved is None:
            raise TensorParallelError(
                f"{what}.backward called without a preceding forward in training mode; "
                "call forward (with layer.training True) first"
            )
        return self._saved

    def _check_grad_shape(self, grad: Any, expected, what: str) -> Any:
        grad = as_array_like(grad, f"{what} grad_output")
        if tuple(grad.shape) != tuple(expected):
            raise ShapeError(f"{what} grad_output must have shape {tuple(expected)}, got {tuple(grad.shape)}")
        return grad

    def _check_features(self, x: Any, n_features: int, what: str) -> Any:
        """Check that ``x`` is a real array of rank >= 1 with ``n_features`` on its last axis."""
        x = as_array_like(x, what)
        kind = np.dtype(x.dtype).kind
        if kind not in "iuf":
            raise ShapeError(f"{what} must hold real numbers, got dtype {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != n_features:
            raise ShapeError(f"{what} must have shape (..., {n_features}), got {tuple(x.shape)}")
        return x

    @property
    def n_workers(self) -> int:
        """Number of tensor-parallel workers."""
        return self.config.n_workers

    @property
    def devices(self) -> List[Hashable]:
        """The device of each worker this process holds: ``devices[i % len(devices)]`` of the backend."""
        return list(self._placement)

    @property
    def workers(self) -> List[int]:
        """The global ids of the workers this process holds (every worker with one process)."""
        local = len(self._placement)
        return list(range(self.comm.rank * local, (self.comm.rank + 1) * local))

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

