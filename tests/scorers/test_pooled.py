import pytest
import torch

from zigzag.scorers import Knorm, LayerView
from zigzag.scorers.pooled import SpanPooled


def _view(keys, valid):
    batch, _, seq, _ = keys.shape
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return LayerView(keys=keys, values=keys.clone(), valid=valid, positions=positions, scaling=0.125)


def test_kernel_one_is_identity_and_names():
    keys = torch.randn(2, 3, 17, 8)
    view = _view(keys, torch.ones(2, 17, dtype=torch.bool))
    assert torch.equal(SpanPooled(Knorm(), 1).score(view), Knorm().score(view))
    assert SpanPooled(Knorm(), 5).name == "knorm+pool5"
    with pytest.raises(ValueError, match="odd"):
        SpanPooled(Knorm(), 4)


def test_average_of_valid_neighbours_and_padding_invariance():
    keys = torch.randn(1, 2, 12, 8, )
    raw = Knorm().score(_view(keys, torch.ones(1, 12, dtype=torch.bool)))
    pooled = SpanPooled(Knorm(), 3).score(_view(keys, torch.ones(1, 12, dtype=torch.bool)))
    expected = torch.stack([raw[..., max(0, i - 1) : i + 2].mean(-1) for i in range(12)], dim=-1)
    torch.testing.assert_close(pooled, expected)
    padded = torch.cat([torch.randn(1, 2, 5, 8) * 100, keys], dim=2)
    valid = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(SpanPooled(Knorm(), 3).score(_view(padded, valid))[..., 5:], pooled)
