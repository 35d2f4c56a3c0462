from __future__ import annotations

import math

import pytest
import torch

from zigzag.scorers import TOVA


def tova_reference(layer):
    """float64 loops: attention of the last query over every valid key, mean over all query heads."""
    keys = layer.keys.double()
    batch, kv_heads, seq, _ = keys.shape
    q = layer.window_queries[:, :, -1].double()  # (batch, heads, d)
    heads = q.shape[1]
    groups = heads // kv_heads
    out = torch.zeros(batch, seq, dtype=torch.float64)
    for b in range(batch):
        seen = [j for j in range(seq) if layer.valid[b, j]]
        for h in range(heads):
            logits = [float(q[b, h] @ keys[b, h // groups, j]) * layer.scaling for j in seen]
            top = max(logits)
            exps = [math.exp(z - top) for z in logits]
            for j, e in zip(seen, exps):
                out[b, j] += e / sum(exps) / heads
    return out


@pytest.mark.parametrize("groups", [1, 3])
def test_tova_matches_loop_reference(kit, groups):
    kv_heads = 2
    rows = [kit.random_row(n, kv_heads * groups, kv_heads, 8) for n in (14, 9, 2)]
    scorer = TOVA()
    layer = kit.build_for(scorer, rows)
    scores = scorer.score(layer).double()
    assert (scores == scores[:, :1]).all()  # one score per token, shared by the kv heads
    ref = tova_reference(layer)
    seq = layer.seq
    for b in range(len(rows)):
        others = layer.valid[b].clone()
        others[-1] = False
        torch.testing.assert_close(scores[b, 0, others], ref[b, others], rtol=1e-5, atol=1e-7)
        assert scores[b, 0, seq - 1] >= scores[b, 0, others].max() + 1 - 1e-6  # the last token is kept first
