"""Every layer and the loss give the same result whatever the memory layout of their inputs.

Logits that were a strided view (a ShardedTensor of ``np.moveaxis`` views, as a
port of PyTorch's loss-parallel test builds them) lost the -1 at every row's target in the loss
gradient, because the subtraction landed in a reshaped copy. Here every layer runs forward and
backward on inputs and upstream gradients that are C-contiguous, Fortran-ordered, transposed views,
sliced with a step, read-only, torch tensors with strides (where torch is installed), and
ShardedTensors of strided per-shard views; each must give the outputs, input gradients and
parameter gradients of a contiguous copy, and leave the caller's arrays as they were.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import numpy as np
import pytest
from helpers import forward_backward

import tp_gpu as tp
from tp_gpu.errors import ConfigError, IndexOutOfRangeError

SPECS = [pytest.param(("numpy", None), id="numpy"), pytest.param(("simulated", 3), id="sim3")]
WORKERS = [1, 3, 8]

#: float64 results of a strided input against those of its contiguous copy (BLAS may sum a
#: transposed operand in another order; elementwise code, the loss and lookups match exactly).
TOL = 1e-12


# ---------------------------------------------------------------------- layouts of one array


def _transposed(a: np.ndarray) -> np.ndarray:
    """``a``'s values as a transposed view of a C-contiguous array (every axis reversed)."""
    return a.T.copy().T  # the copy method keeps the array's type (a simulated device's array too)


def _stepped(a: Any) -> Any:
    """``a``'s values as a view sliced with a step on the first and last axes (on ``a``'s device)."""
    if a.ndim == 1:
        return np.repeat(a, 3)[1::3]
    return np.repeat(np.repeat(a, 2, axis=0), 3, axis=-1)[::2, ..., 1::3]


def _read_only(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    out.flags.writeable = False
    return out


def _moved(a: np.ndarray) -> np.ndarray:
    """``a``'s values as ``np.moveaxis`` of an array whose last axis comes first."""
    return np.moveaxis(np.moveaxis(a, -1, 0).copy(), 0, -1)


LAYOUTS: Dict[str, Callable[[np.ndarray], Any]] = {
    "fortran": lambda a: a.copy(order="F"),
    "transposed": _transposed,
    "stepped": _stepped,
    "read_only": _read_only,
    "moveaxis": _moved,
}


def _torch_layouts() -> Dict[str, Callable[[np.ndarray], Any]]:
    torch = pytest.importorskip("torch")
    return {
        "torch_transposed": lambda a: torch.from_numpy(np.ascontiguousarray(a.T)).permute(
            *range(a.ndim - 1, -1, -1)
        ),
        "torch_stepped": lambda a: torch.from_numpy(_stepped(a)),
        "torch_permuted": lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0))).movedim(
            0, -1
        ),
    }


def _layouts(torch: bool) -> Dict[str, Callable[[np.ndarray], Any]]:
    return _torch_layouts() if torch else LAYOUTS


def _to_host(x: Any) -> np.ndarray:
    from tp_gpu.backends import host_array

    return np.asarray(host_array(x))


def _host(x: Any) -> np.ndarray:
    """An output or gradient as a new host array (a ShardedTensor gathered first)."""
    return np.array(tp.to_numpy(x))


def _leaf(logits: tp.ShardedTensor) -> tp.ShardedTensor:
    """A new leaf over ``logits``' own blocks (strides kept), requiring grad: its ``.grad`` is ``dZ``."""
    return logits.detach().requires_grad_()


def _strided_sharded(full: np.ndarray, config: tp.TensorParallelConfig, axis: int = -1) -> tp.ShardedTensor:
    """``full`` as a ShardedTensor split on ``axis`` as ``config``'s layers split it, each shard a
    strided view on its device (``np.moveaxis`` of a block whose split axis comes first)."""
    group = tp.get_group(config)
    layout = group.split(full.shape[axis])
    backend = group.backend
    moved = np.ascontiguousarray(np.moveaxis(full, axis, 0))  # the split axis first, then moved back
    shards = []
    for w, (first, last) in enumerate(layout.ranges):
        device = layout.devices[w]
        block = backend.asarray(moved[first:last], full.dtype, device)
        with backend.device(device):
            shards.append(np.moveaxis(block, 0, axis))
    return tp.ShardedTensor(shards, axis, list(layout.devices), backend)


def _contiguous_sharded(
    full: np.ndarray, config: tp.TensorParallelConfig, axis: int = -1
) -> tp.ShardedTensor:
    group = tp.get_group(config)
    layout = group.split(full.shape[axis])
    index = (slice(None),) * (axis % full.ndim)
    shards = [
        group.backend.asarray(np.ascontiguousarray(full[index + (slice(a, b),)]), full.dtype, d)
        for (a, b), d in zip(layout.ranges, layout.devices)
    ]
    return tp.ShardedTensor(shards, axis, list(layout.devices), group.backend)


# ---------------------------------------------------------------------- one run, compared


def _run(build: Callable[[], Any], call: Callable[[Any, List[Any]], Any], args: List[Any]) -> Dict[str, Any]:
    """A fresh layer's outputs, input gradients and parameter gradients for ``args``."""
    layer = build()
    out = call(layer, args)
    result = {f"out{i}": _host(o) for i, o in enumerate(out) if o is not None}
    if hasattr(layer, "named_parameters"):
        result.update({f"grad:{n}": p.full_grad() for n, p in layer.named_parameters()})
    return result


def _check_same(got: Dict[str, Any], ref: Dict[str, Any], what: str, exact: bool = False) -> None:
    assert got.keys() == ref.keys(), what
    for key in ref:
        if exact:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{what}: {key}")
        else:
            scale = max(1.0, float(np.max(np.abs(ref[key]), initial=0.0)))
            np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=TOL * scale, err_msg=f"{what}: {key}")


def _snapshot(args: List[Any]) -> List[Any]:
    return [None if isinstance(a, tp.ShardedTensor) else np.array(_to_host(a)) for a in args]


def _check_unchanged(args: List[Any], before: List[Any], what: str) -> None:
    for i, (a, b) in enumerate(zip(args, before)):
        if b is not None:
            np.testing.assert_array_equal(_to_host(a), b, err_msg=f"{what}: input {i} was modified")


def _compare_layouts(
    build: Callable[[], Any],
    call: Callable[[Any, List[Any]], Any],
    arrays: List[np.ndarray],
    torch: bool,
    exact: bool = False,
) -> None:
    """Each layout of each array in turn (the others contiguous) against all-contiguous arrays."""
    ref = _run(build, call, [a.copy() for a in arrays])
    for i in range(len(arrays)):
        for name, make in _layouts(torch).items():
            args = [make(b) if j == i else b.copy() for j, b in enumerate(arrays)]
            before = _snapshot(args)
            _check_same(_run(build, call, args), ref, f"argument {i} {name}", exact)
            _check_unchanged(args, before, f"argument {i} {name}")


@pytest.fixture(params=SPECS)
def spec(request):
    return request.param


def _config(spec, n_workers: int, **kwargs) -> tp.TensorParallelConfig:
    name, devices = spec
    return tp.TensorParallelConfig(
        n_workers=n_workers, backend=name, devices=devices, dtype="float64", **kwargs
    )


def _forward_backward(layer: Any, args: List[Any]) -> List[Any]:
    """``y = layer(x)``, ``y.backward(dy)``: ``[y, dx]`` for ``args = [x, dy]``."""
    return list(forward_backward(layer, args[0], args[1]))


def _forward_backward_ids(layer: Any, args: List[Any], **kwargs: Any) -> List[Any]:
    """``y = layer(ids, **kwargs)``, ``y.backward(dy)`` for ``args = [ids, dy, ...]``: ``[y]`` (ids get
    no gradient; the parameters' gradients are compared by :func:`_run`)."""
    y = layer(args[0], **kwargs)
    y.backward(args[1])
    return [y]


# ---------------------------------------------------------------------- the layers


@pytest.mark.parametrize("torch", [False, True], ids=["numpy_views", "torch"])
@pytest.mark.parametrize("n_workers", WORKERS)
class TestDenseLayers:
    def test_column_linear(self, spec, n_workers, torch):
        rng = np.random.default_rng(1)
        cfg = _config(spec, n_workers)
        x, dy = rng.standard_normal((4, 5, 7)), rng.standard_normal((4, 5, 13))
        _compare_layouts(
            lambda: tp.ColumnParallelLinear(7, 13, cfg, seed=3), _forward_backward, [x, dy], torch
        )

    def test_row_linear(self, spec, n_workers, torch):
        rng = np.random.default_rng(2)
        cfg = _config(spec, n_workers)
        x, dy = rng.standard_normal((4, 5, 13)), rng.standard_normal((4, 5, 7))
        _compare_layouts(lambda: tp.RowParallelLinear(13, 7, cfg, seed=3), _forward_backward, [x, dy], torch)

    def test_mlp(self, spec, n_workers, torch):
        rng = np.random.default_rng(3)
        cfg = _config(spec, n_workers)
        x, dy = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 4, 5))
        _compare_layouts(lambda: tp.ParallelMLP(6, 11, 5, cfg, seed=1), _forward_backward, [x, dy], torch)

    def test_residual_mlp(self, spec, n_workers, torch):
        rng = np.random.default_rng(4)
        cfg = _config(spec, n_workers)
        x, dy = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 4, 6))
        _compare_layouts(lambda: tp.Residual(tp.ParallelMLP(6, 9, 6, cfg)), _forward_backward, [x, dy], torch)

    def test_layer_norm(self, spec, n_workers, torch):
        rng = np.random.default_rng(5)
        cfg = _config(spec, n_workers)
        x, dy = rng.standard_normal((3, 4, 6)) * 3 + 1, rng.standard_normal((3, 4, 6))
        _compare_layouts(lambda: tp.LayerNorm(6, cfg), _forward_backward, [x, dy], torch)

    def test_dropout(self, spec, n_workers, torch):
        rng = np.random.default_rng(6)
        cfg = _config(spec, n_workers)
        x, dy = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 4, 6))
        _compare_layouts(lambda: tp.Dropout(0.3, cfg, seed=2), _forward_backward, [x, dy], torch, exact=True)

    def test_attention(self, spec, n_workers, torch):
        rng = np.random.default_rng(7)
        cfg = _config(spec, n_workers)
        x, dy = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
        keep = (rng.random((2, 5)) > 0.3).astype(np.float64)
        keep[:, 0] = 1

        def call(layer, args):
            return list(forward_backward(layer, args[0], args[1], attention_mask=args[2]))

        build = lambda: tp.ParallelSelfAttention(8, 4, cfg, seed=1)  # noqa: E731
        _compare_layouts(build, call, [x, dy, keep], torch)

    def test_transformer_layer(self, spec, n_workers, torch):
        rng = np.random.default_rng(8)
        cfg = _config(spec, n_workers)
        x, dy = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
        build = lambda: tp.ParallelTransformerLayer(8, 4, 12, cfg, seed=2, causal=True)  # noqa: E731
        _compare_layouts(build, _forward_backward, [x, dy], torch)

    def test_embedding(self, spec, n_workers, torch):
        rng = np.random.default_rng(9)
        cfg = _config(spec, n_workers)
        ids, dy = rng.integers(0, 11, size=(4, 6)), rng.standard_normal((4, 6, 5))

        build = lambda: tp.ParallelEmbedding(11, 5, cfg, seed=1)  # noqa: E731
        _compare_layouts(build, _forward_backward_ids, [ids, dy], torch, exact=True)

    def test_bert_embeddings(self, spec, n_workers, torch):
        rng = np.random.default_rng(10)
        cfg = _config(spec, n_workers)
        ids, types = rng.integers(0, 11, size=(3, 6)), rng.integers(0, 2, size=(3, 6))
        dy = rng.standard_normal((3, 6, 8))

        def call(layer, args):
            return _forward_backward_ids(layer, args, token_type_ids=args[2])

        build = lambda: tp.BertEmbeddings(11, 8, 6, 2, cfg, seed=1)  # noqa: E731
        _compare_layouts(build, call, [ids, dy, types], torch)


# ---------------------------------------------------------------------- sharded inputs and gradients


def _sharded_kinds(cfg: tp.TensorParallelConfig, axis: int = -1) -> Dict[str, Callable[[np.ndarray], Any]]:
    return {
        "strided_shards": lambda a: _strided_sharded(a, cfg, axis),
        "contiguous_shards": lambda a: _contiguous_sharded(a, cfg, axis),
    }


@pytest.mark.parametrize("n_workers", WORKERS)
class TestShardedInputs:
    def _compare(self, build, call, arrays, kinds, sharded, exact=False):
        """Arrays at the positions ``sharded`` passed as ShardedTensors of each kind, against
        contiguous shards."""

        def run(kind):
            args = [kinds[kind](a) if i in sharded else a.copy() for i, a in enumerate(arrays)]
            return _run(build, call, args)

        ref = run("contiguous_shards")
        _check_same(run("strided_shards"), ref, "strided shards", exact)

    def test_row_linear_sharded_input(self, spec, n_workers):
        rng = np.random.default_rng(11)
        cfg = _config(spec, n_workers)
        x, dy = rng.standard_normal((4, 3, 13)), rng.standard_normal((4, 3, 7))
        build = lambda: tp.RowParallelLinear(13, 7, cfg, seed=3, input_is_parallel=True)  # noqa: E731
        self._compare(build, _forward_backward, [x, dy], _sharded_kinds(cfg), {0})

    def test_column_linear_sharded_grad(self, spec, n_workers):
        rng = np.random.default_rng(12)
        cfg = _config(spec, n_workers, gather_output=False)
        x, dy = rng.standard_normal((4, 3, 7)), rng.standard_normal((4, 3, 13))
        build = lambda: tp.ColumnParallelLinear(7, 13, cfg, seed=3)  # noqa: E731
        self._compare(build, _forward_backward, [x, dy], _sharded_kinds(cfg), {1})

    def test_layer_norm_sequence_split(self, spec, n_workers):
        rng = np.random.default_rng(13)
        cfg = _config(spec, n_workers)
        x, dy = rng.standard_normal((2, 9, 6)), rng.standard_normal((2, 9, 6))
        self._compare(
            lambda: tp.LayerNorm(6, cfg), _forward_backward, [x, dy], _sharded_kinds(cfg, 1), {0, 1}
        )

    def test_column_linear_sequence_parallel(self, spec, n_workers):
        rng = np.random.default_rng(14)
        cfg = _config(spec, n_workers, sequence_parallel=True)
        x, dy = rng.standard_normal((2, 9, 7)), rng.standard_normal((2, 9, 13))
        build = lambda: tp.ColumnParallelLinear(7, 13, cfg, seed=3)  # noqa: E731
        self._compare(build, _forward_backward, [x, dy], _sharded_kinds(cfg, 1), {0})

    def test_tied_head(self, spec, n_workers):
        rng = np.random.default_rng(15)
        cfg = _config(spec, n_workers)
        x, dy = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 11))

        def build():
            return tp.TiedLMHead(tp.ParallelEmbedding(11, 5, cfg, seed=2))

        self._compare(build, _forward_backward, [x, dy], _sharded_kinds(cfg), {1})
        ref = _run(build, _forward_backward, [x, _contiguous_sharded(dy, cfg)])
        for name, make in LAYOUTS.items():
            _check_same(_run(build, _forward_backward, [make(x), _strided_sharded(dy, cfg)]), ref, name)


# ---------------------------------------------------------------------- the loss


def _loss_reference(logits: np.ndarray, targets: np.ndarray, reduction: str) -> tuple:
    """Loss and ``dZ`` in float64 NumPy (no smoothing, no weights, no ignored rows)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    picked = np.take_along_axis(p, targets[..., None], axis=-1)[..., 0]
    rows = -np.log(picked)
    grad = p.copy()
    np.put_along_axis(grad, targets[..., None], picked[..., None] - 1.0, axis=-1)
    if reduction == "mean":
        return rows.mean(), grad / targets.size
    return rows.sum(), grad


@pytest.mark.parametrize("n_workers", WORKERS)
class TestLoss:
    def _loss(self, cfg, logits, targets, grad_loss=1.0, **kwargs):
        logits = _leaf(logits)
        value = tp.VocabParallelCrossEntropy(**kwargs)(logits, targets)
        value.backward(grad_loss)
        return _host(value) if kwargs.get("reduction") == "none" else float(value), _host(logits.grad)

    @pytest.mark.parametrize("reduction", ["mean", "sum"])
    def test_moveaxis_logits_issue_20(self, spec, n_workers, reduction):
        """The issue's case: channels on axis 1, moved last as views; the -1 at each target was lost."""
        rng = np.random.default_rng(20)
        cfg = _config(spec, n_workers)
        x = rng.standard_normal((4, 13, 6))  # (B, C, D) as PyTorch's loss-parallel test builds it
        logits = np.moveaxis(x, 1, -1)  # (B, D, C), a view
        targets = rng.integers(0, 13, size=(4, 6))
        want_loss, want_grad = _loss_reference(logits, targets, reduction)
        for kind, make in _sharded_kinds(cfg).items():
            value, grad = self._loss(cfg, make(np.array(logits)), targets, reduction=reduction)
            np.testing.assert_allclose(value, want_loss, rtol=1e-13, err_msg=kind)
            np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-15, err_msg=kind)

    @pytest.mark.parametrize(
        "options", [{}, {"label_smoothing": 0.1}, {"reduction": "none"}, {"ignore_index": 2}], ids=str
    )
    def test_every_layout_same_result(self, spec, n_workers, options):
        rng = np.random.default_rng(21)
        cfg = _config(spec, n_workers)
        full = rng.standard_normal((3, 5, 13))
        targets = rng.integers(0, 13, size=(3, 5))
        grad_loss = rng.standard_normal((3, 5)) if options.get("reduction") == "none" else 0.7
        ref = self._loss(cfg, _contiguous_sharded(full, cfg), targets.copy(), grad_loss, **options)
        for kind, make in _sharded_kinds(cfg).items():
            for name, lay in {"c": np.array, **LAYOUTS}.items():
                shards = make(full)
                logits = (
                    shards
                    if name == "c"
                    else tp.ShardedTensor(
                        [_relayout(s, lay, shards.backend) for s in shards.shards],
                        -1,
                        shards.devices,
                        shards.backend,
                    )
                )
                value, grad = self._loss(cfg, logits, lay(targets), grad_loss, **options)
                what = f"{kind} {name}"
                # a strided vocabulary axis is summed in another order: equal to the last bits
                np.testing.assert_allclose(value, ref[0], rtol=TOL, atol=0, err_msg=what)
                np.testing.assert_allclose(grad, ref[1], rtol=0, atol=TOL * 1e-3, err_msg=what)
                if options.get("reduction") == "none":
                    value, grad = self._loss(cfg, logits, targets, lay(grad_loss), **options)
                    np.testing.assert_allclose(
                        grad, ref[1], rtol=0, atol=TOL * 1e-3, err_msg=f"{what} grad_loss"
                    )
                np.testing.assert_array_equal(_host(logits), full)  # the logits are unchanged

    def test_torch_strided_targets_and_grad(self, spec, n_workers):
        torch = pytest.importorskip("torch")
        rng = np.random.default_rng(22)
        cfg = _config(spec, n_workers)
        x = rng.standard_normal((4, 13, 6))
        targets = rng.integers(0, 13, size=(4, 6))
        grad_loss = rng.standard_normal((4, 6))
        want = torch.nn.functional.cross_entropy(
            torch.from_numpy(x).requires_grad_(), torch.from_numpy(targets), reduction="none"
        )
        xt = torch.from_numpy(x).requires_grad_()
        lt = torch.nn.functional.cross_entropy(xt, torch.from_numpy(targets), reduction="none")
        lt.backward(torch.from_numpy(grad_loss))
        targets_view = torch.from_numpy(np.ascontiguousarray(targets.T)).T  # strided torch targets
        grad_view = torch.from_numpy(np.ascontiguousarray(grad_loss.T)).T
        value, grad = self._loss(
            cfg, _strided_sharded(np.moveaxis(x, 1, -1), cfg), targets_view, grad_view, reduction="none"
        )
        np.testing.assert_allclose(value, want.detach().numpy(), rtol=1e-13)
        np.testing.assert_allclose(grad, np.moveaxis(xt.grad.numpy(), 1, -1), rtol=0, atol=1e-15)

    def test_inplace_strided_logits_correct(self, spec, n_workers):
        rng = np.random.default_rng(23)
        cfg = _config(spec, n_workers)
        x = rng.standard_normal((4, 13, 6))
        targets = rng.integers(0, 13, size=(4, 6))
        want_loss, want_grad = _loss_reference(np.moveaxis(x, 1, -1), targets, "sum")
        value, grad = self._loss(
            cfg, _strided_sharded(np.moveaxis(x, 1, -1), cfg), targets, inplace=True, reduction="sum"
        )
        np.testing.assert_allclose(value, want_loss, rtol=1e-13)
        np.testing.assert_allclose(grad, want_grad, rtol=0, atol=1e-15)

    def test_inplace_read_only_logits_raise_before_anything_changes(self, spec, n_workers):
        rng = np.random.default_rng(24)
        cfg = _config(spec, n_workers)
        full = rng.standard_normal((3, 13))
        shards = _contiguous_sharded(full, cfg).shards  # the caller's arrays
        shards = [s.copy() for s in shards]  # each its own (a ShardedTensor's shards view its blocks)
        for shard in shards[1:] or shards:
            shard.flags.writeable = False
        before = [np.array(s) for s in shards]
        group = tp.get_group(cfg)
        logits = tp.ShardedTensor(shards, -1, group.split(13).devices, group.backend)
        loss = tp.VocabParallelCrossEntropy(inplace=True)
        if any(b.flags.writeable is False for b in logits.device_blocks().values()):
            with pytest.raises(ConfigError, match="read-only"):
                loss(logits, rng.integers(0, 13, size=3))
        else:  # workers sharing a device: their shards were concatenated into a new, writable block
            loss(logits, rng.integers(0, 13, size=3))
        for shard, b in zip(shards, before):  # the caller's arrays as they were
            np.testing.assert_array_equal(np.asarray(shard), b)


def _relayout(shard: Any, lay: Callable[[Any], Any], backend: Any) -> Any:
    """``shard`` in layout ``lay``, made on its own device."""
    with backend.device(backend.device_of(shard)):
        return lay(shard)


@pytest.mark.parametrize("spec_", SPECS)
def test_uint64_target_reported_as_its_value(spec_):
    cfg = _config(spec_, 3)
    logits = _contiguous_sharded(np.zeros((2, 13)), cfg)
    for ignore in (-100, -1):
        with pytest.raises(IndexOutOfRangeError, match=f"target {2**64 - 1} out of range"):
            tp.VocabParallelCrossEntropy(ignore_index=ignore)(
                logits, np.array([1, 2**64 - 1], dtype=np.uint64)
            )
    with pytest.raises(IndexOutOfRangeError, match=f"target {2**64 - 100} out of range"):
        tp.VocabParallelCrossEntropy()(logits, np.array([2**64 - 100, 1], dtype=np.uint64))
    value = tp.VocabParallelCrossEntropy()(logits, np.array([1, 12], dtype=np.uint64))
    assert float(value) == pytest.approx(np.log(13))


@pytest.mark.parametrize("n_workers", WORKERS)
def test_torch_strided_shards(n_workers):
    """A ShardedTensor of strided torch tensors (host memory, read through DLPack) gives the loss and
    the row-parallel layer what NumPy shards give, and torch's own result."""
    torch = pytest.importorskip("torch")
    cfg = _config(("numpy", None), n_workers)
    rng = np.random.default_rng(30)
    x = rng.standard_normal((4, 13, 6))
    targets = rng.integers(0, 13, size=(4, 6))
    layout = tp.get_group(cfg).split(13)
    xt = torch.from_numpy(x)
    shards = [xt[:, a:b].movedim(1, -1) for a, b in layout.ranges]  # strided views (B, D, C_i)
    logits = tp.ShardedTensor(shards, -1, list(layout.devices), tp.get_group(cfg).backend).requires_grad_()
    loss = tp.VocabParallelCrossEntropy(reduction="sum")
    value = loss(logits, targets)
    value.backward()
    grad = _host(logits.grad)
    leaf = xt.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(leaf, torch.from_numpy(targets), reduction="sum")
    want.backward()
    assert float(value) == pytest.approx(want.item(), rel=1e-13)
    np.testing.assert_allclose(grad, np.moveaxis(leaf.grad.numpy(), 1, -1), rtol=0, atol=1e-14)
    np.testing.assert_array_equal(xt.numpy(), x)  # the caller's tensor is unchanged

    h = rng.standard_normal((3, 13))
    ht = torch.from_numpy(np.ascontiguousarray(h.T)).T  # (3, 13), strided
    row = tp.RowParallelLinear(13, 5, cfg, seed=1, input_is_parallel=True)
    y = row(tp.ShardedTensor([ht[:, a:b] for a, b in layout.ranges], -1, list(layout.devices), row.backend))
    np.testing.assert_allclose(_host(y), h @ row.full_weight() + row.full_bias(), rtol=0, atol=1e-13)


def test_torch_shards_on_simulated_devices_are_refused():
    torch = pytest.importorskip("torch")
    cfg = _config(("simulated", 3), 2)
    backend = tp.get_group(cfg).backend
    with pytest.raises(tp.ShapeError, match="lives on device 'host'; expected 0"):
        tp.ShardedTensor([torch.zeros(2, 3), torch.zeros(2, 3)], -1, [0, 1], backend)
