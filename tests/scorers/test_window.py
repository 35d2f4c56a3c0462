"""window_attention, group_mean and raise_protected against float64 references."""

from __future__ import annotations

import pytest
import torch

from zigzag.scorers import group_mean, window_attention
from zigzag.scorers.window import raise_protected


def full_attention_last_rows(queries_all, keys, valid, scaling, w):
    """Reference: full (seq x seq) causal attention from every query in float64, last w rows kept."""
    batch, heads, seq, d = queries_all.shape
    groups = heads // keys.shape[1]
    q = queries_all.double()
    k = keys.double().repeat_interleave(groups, dim=1)  # (batch, heads, seq, d)
    logits = q @ k.transpose(-1, -2) * scaling  # (batch, heads, seq, seq)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs[:, :, seq - w :]


@pytest.mark.parametrize("w", [1, 4, 9])
@pytest.mark.parametrize("groups", [1, 3])
def test_window_attention_matches_full_causal_attention(w, groups):
    batch, kv_heads, seq, d = 3, 2, 9, 8
    heads = kv_heads * groups
    queries_all = torch.randn(batch, heads, seq, d)
    keys = torch.randn(batch, kv_heads, seq, d)
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    valid[2, :7] = False  # padding reaches into the window
    scaling = 0.37
    probs = window_attention(queries_all[:, :, seq - w :], keys, valid, scaling)
    assert probs.shape == (batch, heads, w, seq) and probs.dtype == torch.float32
    ref = full_attention_last_rows(queries_all, keys, valid, scaling, w)
    torch.testing.assert_close(probs.double(), ref, rtol=1e-5, atol=1e-6)
    # padded keys get nothing; queries that see a valid key sum to 1, the others to 0
    assert (probs * ~valid[:, None, None, :] == 0).all()
    sums = probs.sum(-1)
    q_sees = valid[:, seq - w :]  # a left-padded query sees no valid key
    torch.testing.assert_close(sums, q_sees[:, None, :].float().expand_as(sums))


@pytest.mark.parametrize("w", [1, 5, 9])
@pytest.mark.parametrize("groups", [1, 3])
def test_window_attention_without_padding_skips_only_the_padding_mask(w, groups):
    """``padded=False`` (no padding anywhere) masks only the window's own keys causally: the same
    probabilities as the full float64 reference and as the masked path, on fresh inputs."""
    batch, kv_heads, seq, d = 2, 2, 9, 8
    queries_all = torch.randn(batch, kv_heads * groups, seq, d)
    keys = torch.randn(batch, kv_heads, seq, d)
    valid = torch.ones(batch, seq, dtype=torch.bool)
    fast = window_attention(queries_all[:, :, seq - w :], keys, valid, 0.37, padded=False)
    ref = full_attention_last_rows(queries_all, keys, valid, 0.37, w)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-6)
    masked = window_attention(queries_all[:, :, seq - w :], keys, valid, 0.37, padded=True)
    torch.testing.assert_close(fast, masked, rtol=0, atol=0)


def test_window_attention_accepts_bfloat16_and_rejects_bad_shapes():
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    valid = torch.ones(1, 5, dtype=torch.bool)
    assert window_attention(q, k, valid, 0.3).dtype == torch.float32
    with pytest.raises(ValueError):
        window_attention(torch.randn(1, 4, 6, 8), k, valid, 0.3)  # window > seq
    with pytest.raises(ValueError):
        window_attention(torch.randn(1, 3, 2, 8), k, valid, 0.3)  # heads not a multiple
    with pytest.raises(ValueError):
        window_attention(q, k, valid[:, :4], 0.3)


def test_group_mean():
    x = torch.randn(2, 6, 5)
    out = group_mean(x, 2)
    for b in range(2):
        for kv in range(2):
            torch.testing.assert_close(out[b, kv], x[b, kv * 3 : kv * 3 + 3].mean(0))
    with pytest.raises(ValueError):
        group_mean(x, 4)


def test_raise_protected_lifts_and_keeps_order():
    scores = torch.randn(2, 3, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :4] = False
    protected = torch.zeros(2, 10, dtype=torch.bool)
    protected[:, -3:] = True
    out = raise_protected(scores, protected, valid)
    for b in range(2):
        others = valid[b] & ~protected[b]
        for h in range(3):
            assert out[b, h, protected[b]].min() >= out[b, h, others].max() + 1 - 1e-6
            torch.testing.assert_close(out[b, h, others], scores[b, h, others])
            diffs = out[b, h, protected[b]] - scores[b, h, protected[b]]
            torch.testing.assert_close(diffs, diffs[:1].expand_as(diffs))  # one shift: order kept
