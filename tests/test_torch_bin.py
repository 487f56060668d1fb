"""Reading pytorch_model.bin without PyTorch: tensors rebuilt from their storage, within its bounds."""

from __future__ import annotations

import numpy as np
import pytest

from tp_gpu.errors import CheckpointError
from tp_gpu.models.torch_bin import _rebuild_tensor, read_torch_bin


def test_a_strided_tensor_is_rebuilt_from_its_storage():
    storage = np.arange(12.0)
    np.testing.assert_array_equal(_rebuild_tensor(storage, 2, (2, 3), (1, 2)), [[2, 4, 6], [3, 5, 7]])
    assert _rebuild_tensor(storage, 0, (0, 4), (4, 1)).shape == (0, 4)


@pytest.mark.parametrize(
    "offset, size, stride",
    [(0, (3, 5), (4, 1)), (10, (2, 2), (2, 1)), (0, (2,), (-1,)), (-1, (2,), (1,)), (0, (2, 2), (1,))],
)
def test_sizes_and_strides_outside_the_storage_are_refused(offset, size, stride):
    """``as_strided`` reads whatever memory the numbers name: a damaged file must not make it."""
    with pytest.raises(CheckpointError, match="does not fit its storage of 12 elements"):
        _rebuild_tensor(np.arange(12.0), offset, size, stride)


def test_a_file_saved_by_torch_reads_the_same(tmp_path):
    torch = pytest.importorskip("torch")
    state = {"w": torch.arange(12.0).reshape(3, 4).t(), "b": torch.arange(3, dtype=torch.int64)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    read = read_torch_bin(str(tmp_path / "pytorch_model.bin"))
    assert sorted(read) == ["b", "w"]
    for name, tensor in state.items():
        np.testing.assert_array_equal(read[name], tensor.numpy())
