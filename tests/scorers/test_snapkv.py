from __future__ import annotations

import math

import pytest
import torch

from zigzag.scorers import SnapKV


def snapkv_reference(layer, window: int, kernel_size: int):
    """float64 loops: attention of each window query over its causal prefix, mean over the valid
    window queries and the group, zero-padded average pooling of the prefix (count includes padding).
    Returns (scores (batch, kv_heads, seq) before protection, w)."""
    keys = layer.keys.double()
    batch, kv_heads, seq, _ = keys.shape
    w = min(window, seq)
    queries = layer.window_queries[:, :, -w:].double()
    heads = queries.shape[1]
    groups = heads // kv_heads
    out = torch.zeros(batch, kv_heads, seq, dtype=torch.float64)
    for b in range(batch):
        q_rows = [i for i in range(w) if layer.valid[b, seq - w + i]]
        for h in range(heads):
            mass = [0.0] * seq
            for i in q_rows:
                t = seq - w + i  # the query's sequence index
                seen = [j for j in range(t + 1) if layer.valid[b, j]]
                logits = [float(queries[b, h, i] @ keys[b, h // groups, j]) * layer.scaling for j in seen]
                top = max(logits)
                exps = [math.exp(z - top) for z in logits]
                total = sum(exps)
                for j, e in zip(seen, exps):
                    mass[j] += e / total / len(q_rows)
            for j in range(seq):
                out[b, h // groups, j] += mass[j] / groups
    prefix = seq - w
    pooled = out.clone()
    r = kernel_size // 2
    for j in range(prefix):
        lo, hi = max(0, j - r), min(prefix, j + r + 1)
        pooled[..., j] = out[..., lo:hi].sum(-1) / kernel_size
    return pooled, w


@pytest.mark.parametrize("window,kernel_size,lengths", [(4, 5, (15, 11)), (6, 3, (12, 3)), (1, 1, (7, 7)), (32, 5, (9, 4))])
@pytest.mark.parametrize("groups", [1, 3])
def test_snapkv_matches_loop_reference(kit, window, kernel_size, lengths, groups):
    kv_heads, head_dim = 2, 8
    rows = [kit.random_row(n, kv_heads * groups, kv_heads, head_dim) for n in lengths]
    scorer = SnapKV(window=window, kernel_size=kernel_size)
    layer = kit.build_for(scorer, rows)
    scores = scorer.score(layer).double()
    ref, w = snapkv_reference(layer, window, kernel_size)
    seq = layer.seq
    for b in range(len(rows)):
        valid = layer.valid[b]
        in_window = torch.arange(seq) >= seq - w
        others, protected = valid & ~in_window, valid & in_window
        torch.testing.assert_close(scores[b][:, others], ref[b][:, others], rtol=1e-5, atol=1e-7)
        if others.any():
            # the window is protected: above every other token, in its own (unpooled) order
            assert (scores[b][:, protected].amin(-1) >= scores[b][:, others].amax(-1) + 1 - 1e-6).all()
        shift = scores[b][:, protected] - ref[b][:, protected]
        torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), rtol=0, atol=1e-6)


def test_snapkv_uses_last_queries_and_needs_them(kit):
    rows = [kit.random_row(20, 4, 2, 8)]
    scorer = SnapKV(window=5)
    exact = kit.build_for(scorer, rows)
    longer = kit.build(rows, window=12)  # the pipeline may pass more queries than asked for
    torch.testing.assert_close(scorer.score(longer), scorer.score(exact))
    with pytest.raises(ValueError):
        scorer.score(kit.build(rows, window=3))
    with pytest.raises(ValueError):
        scorer.score(kit.build(rows))


def test_query_window_follows_window():
    assert SnapKV(window=17).query_window == 17
    assert SnapKV().query_window == 64
