"""The state of a training run beside the weights: optimizer state, loss scaler, dropout steps.

:func:`tp_gpu.save_checkpoint` stores it when given ``optimizer=`` (and
``scaler=``), so that training resumes exactly, at any worker count:

* the optimizer's per-parameter tensors (Adam's moments, SGD's momentum, float32
  master weights) as logical, unsharded tensors named
  ``optimizer/<parameter name>/<key>``, which re-shard like the weights;
* its step counts and settings, the loss scaler's state and every
  :class:`~tp_gpu.Dropout`'s step counter, as JSON in the ``training`` metadata.

Loading checks and stages all of it before anything changes.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .errors import CheckpointError, ConfigError
from .grad_scaler import GradScaler
from .layers.dropout import Dropout
from .module import Module
from .optim import Optimizer
from .parameter import ShardedParameter

__all__ = ["PREFIX", "METADATA_KEY", "collect", "stage", "is_training_tensor"]

#: Tensor names of optimizer state start with it (parameter names never contain a slash).
PREFIX = "optimizer/"

#: The metadata entry that holds the JSON of the rest.
METADATA_KEY = "training"


def is_training_tensor(name: str) -> bool:
    """True for a tensor of optimizer state, False for a module's parameter."""
    return name.startswith(PREFIX)


def _names(named: List[Tuple[str, ShardedParameter]], optimizer: Optimizer) -> Dict[int, str]:
    """Each optimizer parameter's position -> its name in the module; every one must be in the module."""
    by_id = {id(p): name for name, p in named}
    missing = [i for i, p in enumerate(optimizer.params) if id(p) not in by_id]
    if missing:
        raise ConfigError(
            f"the optimizer holds {len(missing)} parameter(s) (positions {missing}) that are not in the "
            "module being saved; save the whole model the optimizer trains"
        )
    return {i: by_id[id(p)] for i, p in enumerate(optimizer.params)}


def collect(
    module: Module,
    named: List[Tuple[str, ShardedParameter]],
    optimizer: Optional[Optimizer],
    scaler: Optional[GradScaler],
) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """``(tensors, metadata)`` of the training state to save (collective with several processes)."""
    tensors: Dict[str, np.ndarray] = {}
    training: Dict[str, Any] = {"dropout_steps": _dropout_steps(module)}
    if optimizer is not None:
        names = _names(named, optimizer)
        state = optimizer.state_dict()
        steps = {}
        for i, entry in state["state"].items():
            steps[names[i]] = int(entry["step"])
            for key, value in entry.items():
                if key != "step":
                    tensors[f"{PREFIX}{names[i]}/{key}"] = value
        training["optimizer"] = {
            "type": type(optimizer).__name__,
            "param_groups": _jsonable(state["param_groups"]),
            "steps": steps,
        }
    if scaler is not None:
        training["scaler"] = scaler.state_dict()
    return tensors, {METADATA_KEY: json.dumps(training)}


def stage(
    path: str,
    module: Module,
    named: List[Tuple[str, ShardedParameter]],
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
    optimizer: Optional[Optimizer],
    scaler: Optional[GradScaler],
) -> Callable[[], None]:
    """Check and stage the file's training state for ``optimizer``, ``scaler`` and ``module``'s dropout;
    return the function that installs it. Raises CheckpointError before anything changes."""
    try:
        training = json.loads(metadata.get(METADATA_KEY, "{}"))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path!r}: its training metadata is unreadable ({exc})") from None
    commits: List[Callable[[], None]] = [_stage_dropout(path, module, training.get("dropout_steps", {}))]
    if optimizer is not None:
        commits.append(_stage_optimizer(path, named, tensors, training.get("optimizer"), optimizer))
    if scaler is not None:
        state = training.get("scaler")
        if state is None:
            raise CheckpointError(
                f"checkpoint {path!r} holds no loss-scaler state; it was saved without scaler="
            )
        probe = GradScaler()
        probe.load_state_dict(state)  # checks every value first
        commits.append(lambda: scaler.load_state_dict(state))

    def commit() -> None:
        for step in commits:
            step()

    return commit


def _stage_optimizer(
    path: str,
    named: List[Tuple[str, ShardedParameter]],
    tensors: Mapping[str, np.ndarray],
    saved: Optional[Dict[str, Any]],
    optimizer: Optimizer,
) -> Callable[[], None]:
    if saved is None:
        raise CheckpointError(
            f"checkpoint {path!r} holds no optimizer state; it was saved without optimizer="
        )
    if saved["type"] != type(optimizer).__name__:
        raise CheckpointError(
            f"checkpoint {path!r} holds {saved['type']} state; expected {type(optimizer).__name__}'s"
        )
    names = _names(named, optimizer)
    state: Dict[int, Dict[str, Any]] = {}
    for i, name in names.items():
        if name in saved["steps"]:
            keys = [t[len(f"{PREFIX}{name}/") :] for t in tensors if t.startswith(f"{PREFIX}{name}/")]
            state[i] = {"step": saved["steps"][name], **{k: tensors[f"{PREFIX}{name}/{k}"] for k in keys}}
    state_dict = {"state": state, "param_groups": saved["param_groups"]}
    staged = optimizer.stage_state_dict(state_dict)
    return lambda: optimizer.commit_state_dict(state_dict, staged)


def _dropout_steps(module: Module) -> Dict[str, int]:
    return {name: m.step for name, m in module.named_modules() if isinstance(m, Dropout)}


def _stage_dropout(path: str, module: Module, steps: Mapping[str, Any]) -> Callable[[], None]:
    dropouts = {name: m for name, m in module.named_modules() if isinstance(m, Dropout)}
    unknown = sorted(set(steps) - set(dropouts))
    if unknown:
        raise CheckpointError(f"checkpoint {path!r} has dropout steps for {unknown}, which the module lacks")

    def commit() -> None:
        for name, step in steps.items():
            dropouts[name].step = int(step)

    return commit


def _jsonable(value: Any) -> Any:
    """Tuples as lists, NumPy numbers as Python numbers, recursively."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
