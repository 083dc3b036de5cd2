import torch

from dcfx import scalars
from dcfx.scalars import scalar


def test_one_tensor_per_value_dtype_and_device():
    cpu = torch.device("cpu")
    a = scalar(0.25, torch.float32, cpu)
    assert a.shape == () and a.dtype == torch.float32 and a.item() == 0.25
    assert scalar(0.25, torch.float32, cpu) is a
    other = scalar(0.25, torch.float64, cpu)
    assert other is not a and other.dtype == torch.float64
    assert scalar(0.5, torch.float32, cpu) is not a


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(scalars, "_SCALARS", {})
    monkeypatch.setattr(scalars, "MAX_SCALARS", 3)
    for i in range(10):
        assert scalar(float(i), torch.float32, torch.device("cpu")).item() == i
        assert len(scalars._SCALARS) <= 3
