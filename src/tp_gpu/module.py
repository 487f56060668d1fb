"""Module: the tree every layer and model is built of, as in ``torch.nn.Module``.

Submodules and parameters register by attribute assignment
(``self.fc1 = ColumnParallelLinear(...)``, ``self.weight = ShardedParameter(...)``),
and are named with dots (``"fc1.weight"``). A parameter reachable by two
names (tied weights) is listed once, under its first name.

A module writes only ``forward``: the functions it calls record themselves
on the tape (:mod:`tp_gpu.autograd`), and ``loss.backward()`` accumulates
every parameter's gradient. A module called several times in one step gets
the sum of its gradients. ``train()`` / ``eval()`` switch what depends on
the mode (dropout); ``with tp_gpu.no_grad():`` is what keeps no activation.
A module knows its group (:attr:`Module.group`): that of its tensor-parallel
layers, so a composite declares no backend or devices of its own.
"""

from __future__ import annotations

from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Hashable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Set,
    Tuple,
)

import numpy as np

from .errors import ShapeError, TensorParallelError, error_with_problems, short_list
from .parameter import ShardedParameter

if TYPE_CHECKING:
    from .backends.base import Backend
    from .group import TensorParallelGroup

__all__ = ["Module", "Sequential", "ModuleDict", "IncompatibleKeys"]


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict(strict=False)`` did not load, as PyTorch returns it."""

    missing_keys: List[str]
    unexpected_keys: List[str]


class Module:
    """Base of every layer and model: a tree of modules holding :class:`ShardedParameter` s."""

    training: bool
    _modules: Dict[str, Module]
    _parameters: Dict[str, ShardedParameter]

    def __init__(self) -> None:
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_modules" not in self.__dict__:
            raise TensorParallelError(
                f"{type(self).__name__}: call Module.__init__() before setting {name!r}"
            )
        if name in self._parameters and not isinstance(value, (ShardedParameter, type(None))):
            raise TensorParallelError(
                f"cannot assign a {type(value).__name__} to parameter {name!r} of {type(self).__name__}; "
                f"expected a ShardedParameter (to change its value in place: module.{name}.load(array))"
            )
        self._modules.pop(name, None)
        self._parameters.pop(name, None)
        if isinstance(value, Module):
            self._modules[name] = value
        elif isinstance(value, ShardedParameter):
            self._parameters[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self._modules.pop(name, None)
        self._parameters.pop(name, None)
        object.__delattr__(self, name)

    # ------------------------------------------------------------------ the tree

    def named_children(self) -> List[Tuple[str, Module]]:
        """``(name, module)`` of the direct submodules, in registration order."""
        return list(self._modules.items())

    def children(self) -> List[Module]:
        """The direct submodules, in registration order."""
        return list(self._modules.values())

    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, Module]]:
        """``(dotted name, module)`` of this module (name ``prefix``) and every submodule, each once."""
        seen: Set[int] = set()
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [(f"{name}.{child}" if name else child, m) for child, m in module._modules.items()]
            stack.extend(reversed(children))

    def named_parameters(self, prefix: str = "") -> List[Tuple[str, ShardedParameter]]:
        """``(dotted name, parameter)`` of every parameter of the tree; a shared one only once."""
        seen: Set[int] = set()
        named = []
        for module_name, module in self.named_modules(prefix):
            for name, param in module._parameters.items():
                if id(param) not in seen:
                    seen.add(id(param))
                    named.append((f"{module_name}.{name}" if module_name else name, param))
        return named

    def parameters(self) -> List[ShardedParameter]:
        """Every parameter of the tree, in registration order (what the optimizers take)."""
        return [p for _, p in self.named_parameters()]

    # ------------------------------------------------------------------ modes and gradients

    def train(self, mode: bool = True) -> Module:
        """Set training (``True``: dropout active) or evaluation mode in every module of the tree."""
        for _, module in self.named_modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> Module:
        """Evaluation mode (dropout off); pair it with ``tp_gpu.no_grad()`` to keep no activation."""
        return self.train(False)

    # ------------------------------------------------------------------ where it runs

    @property
    def group(self) -> TensorParallelGroup:
        """The devices, backend and communicator this module runs on: its own (a tensor-parallel
        layer's) or else its first submodule's that has one."""
        own = self.__dict__.get("_group")
        if own is not None:
            return own
        for child in self._modules.values():
            try:
                return child.group
            except TensorParallelError:
                continue
        raise TensorParallelError(f"{type(self).__name__} has no tensor-parallel layer, so no group")

    @property
    def backend(self) -> Backend:
        """The backend that owns this module's arrays."""
        return self.group.backend

    @property
    def output_device(self) -> Hashable:
        """Where gathered and reduced outputs land."""
        return self.group.output_device

    @property
    def n_workers(self) -> int:
        """Number of tensor-parallel workers."""
        return self.group.n_workers

    def zero_grad(self) -> None:
        """Reset the accumulated gradients of every parameter."""
        for p in self.parameters():
            p.zero_grad()

    def grads(self) -> Dict[str, np.ndarray]:
        """The accumulated gradients as dense host arrays, keyed like the state dict."""
        return {name: p.full_grad() for name, p in self.named_parameters()}

    # ------------------------------------------------------------------ state dicts

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Every parameter's logical (dense, unsharded) value as a new host NumPy array, by dotted name.

        The values do not depend on the worker count, placement or backend, so
        a state dict saved from one configuration loads into any other.
        """
        return {name: param.full() for name, param in self.named_parameters()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Set parameters from their logical values in ``state_dict``, re-sharding each for this module.

        Values may be host, device or DLPack arrays (a ``torch.Tensor``) and
        are cast to each parameter's dtype. With ``strict`` every key must be
        present and no other; with ``strict=False`` the keys that match are
        loaded and the missing and unexpected ones are returned (strict: a
        ShapeError gives their count and the first five, and its ``problems``
        lists them all). Everything is checked, and staged on the devices, before
        anything is written: on a ShapeError the module is left exactly as it
        was. Not atomic with respect to a forward running in another thread (see
        :func:`tp_gpu.load_checkpoint`).
        """
        what = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise ShapeError(
                f"{what} expects a mapping of parameter name to array, got {type(state_dict).__name__}"
            )
        params = dict(self.named_parameters())
        missing = [name for name in params if name not in state_dict]
        unexpected = [key for key in state_dict if key not in params]
        if strict and (missing or unexpected):
            problems = [f"missing key {name!r}" for name in missing]
            problems += [f"unexpected key {key!r}" for key in unexpected]
            raise error_with_problems(
                ShapeError,
                f"{what}: {len(missing)} missing and {len(unexpected)} unexpected keys",
                problems,
                f"; expected exactly {len(params)} keys: {short_list(list(params))}",
            )
        staged = [
            (p, p.stage(state_dict[name], f"{what}: {name!r}"))
            for name, p in params.items()
            if name in state_dict
        ]
        for param, blocks in staged:
            param.commit(blocks)
        return IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------------ calling

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module's output (its gradient comes from the tape: ``loss.backward()``)."""
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        """The module's own settings, for ``repr``."""
        return ""

    def __repr__(self) -> str:
        lines = [f"  ({name}): " + repr(m).replace("\n", "\n  ") for name, m in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ("\n" + "\n".join(lines) + "\n)" if lines else ")")


class Sequential(Module):
    """Modules applied in order: ``forward`` feeds each output to the next.

    Submodules are named ``"0"``, ``"1"``, ... as in ``torch.nn.Sequential``.
    """

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for i, module in enumerate(modules):
            if not isinstance(module, Module):
                raise TensorParallelError(
                    f"Sequential takes modules, got {type(module).__name__} at position {i}"
                )
            setattr(self, str(i), module)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def forward(self, x: Any) -> Any:
        for module in self._modules.values():
            x = module(x)
        return x


class ModuleDict(Module):
    """Modules by name, registered as submodules: ``ModuleDict({"embed": emb, "head": head})``."""

    def __init__(self, modules: Optional[Mapping[str, Module]] = None) -> None:
        super().__init__()
        for name, module in (modules or {}).items():
            self[name] = module

    def __setitem__(self, name: str, module: Module) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise TensorParallelError(f"ModuleDict keys must be non-empty strings without dots, got {name!r}")
        if not isinstance(module, Module):
            raise TensorParallelError(
                f"ModuleDict values must be modules, got {type(module).__name__} for {name!r}"
            )
        setattr(self, name, module)

    def __getitem__(self, name: str) -> Module:
        return self._modules[name]

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def keys(self) -> List[str]:
        return list(self._modules)

    def items(self) -> List[Tuple[str, Module]]:
        return list(self._modules.items())

    def values(self) -> List[Module]:
        return list(self._modules.values())
