"""ChunkKV against a plain-loop reference, and the selections its scores make."""

from __future__ import annotations

import pytest
import torch

from zigzag.scorers import TOVA, Knorm, LayerView, SnapKV
from zigzag.scorers.chunkkv import ChunkKV


class Fixed:
    """A scorer returning given scores (batch, kv_heads, seq)."""

    name = "fixed"
    query_window = 0
    needs_query_stats = False
    query_stats_skip = 0

    def __init__(self, scores):
        self.scores = scores

    def score(self, layer):
        return self.scores.clone()


def _view(batch, kv_heads, seq, pads=()):
    valid = torch.ones(batch, seq, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    keys = torch.randn(batch, kv_heads, seq, 4)
    return LayerView(keys=keys, values=keys.clone(), valid=valid, positions=positions, scaling=0.5)


def chunk_reference(inner, valid, c):
    """float64 loops: chunks of c consecutive valid tokens, ranked by their mean inner score (ties:
    the later chunk ranks higher); token = chunk rank + (c - offset) / (c + 1). NaN on padding."""
    batch, kv_heads, seq = inner.shape
    out = torch.full((batch, kv_heads, seq), float("nan"), dtype=torch.float64)
    for b in range(batch):
        cols = [j for j in range(seq) if valid[b, j]]
        chunks = [cols[i : i + c] for i in range(0, len(cols), c)]
        for h in range(kv_heads):
            means = [sum(float(inner[b, h, j]) for j in ch) / len(ch) for ch in chunks]
            # rank = number of chunks below: strictly smaller mean, or equal mean and earlier index
            for k, ch in enumerate(chunks):
                rank = sum(1 for i, m in enumerate(means) if m < means[k] or (m == means[k] and i < k))
                for offset, j in enumerate(ch):
                    out[b, h, j] = rank + (c - offset) / (c + 1)
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, 10])
@pytest.mark.parametrize("inner_name", ["knorm", "snapkv", "tova"])
def test_matches_loop_reference(kit, chunk_size, inner_name):
    inner = {"knorm": Knorm(), "snapkv": SnapKV(window=6, kernel_size=3), "tova": TOVA()}[inner_name]
    rows = [kit.random_row(n, 6, 2, 8) for n in (31, 24, 7, 1)]
    scorer = ChunkKV(inner, chunk_size)
    layer = kit.build_for(scorer, rows)
    scores = scorer.score(layer)
    assert scores.dtype == torch.float32
    ref = chunk_reference(inner.score(layer).double(), layer.valid, chunk_size)
    valid = layer.valid[:, None, :].expand_as(scores)
    torch.testing.assert_close(scores.double()[valid], ref[valid], rtol=0, atol=1e-6)


def test_a_budget_keeps_whole_chunks_then_a_prefix():
    torch.manual_seed(0)
    seq, c = 23, 5  # chunks [0, 5), [5, 10), [10, 15), [15, 20), [20, 23)
    inner = torch.randn(1, 1, seq)
    inner[0, 0, 10:15] += 10  # best chunk
    inner[0, 0, 0:5] += 5  # second best
    scores = ChunkKV(Fixed(inner), c).score(_view(1, 1, seq))[0, 0]
    for budget in range(1, 2 * c + 1):
        kept = sorted(scores.topk(budget).indices.tolist())
        if budget <= c:
            assert kept == list(range(10, 10 + budget))  # a contiguous start of the best chunk
        else:
            assert kept == list(range(budget - c)) + list(range(10, 15))


def test_padding_does_not_move_chunk_boundaries():
    """Chunks count from the first valid token: a left-padded row scores like the row alone."""
    torch.manual_seed(1)
    alone = torch.randn(1, 2, 13)
    padded = torch.cat([torch.randn(1, 2, 4) * 100, alone], dim=-1)
    a = ChunkKV(Fixed(alone), 4).score(_view(1, 2, 13))
    p = ChunkKV(Fixed(padded), 4).score(_view(1, 2, 17, pads=(4,)))
    torch.testing.assert_close(p[..., 4:], a, rtol=0, atol=0)


def test_ranks_make_the_scale_of_the_inner_scores_irrelevant():
    """A positive affine map of the inner scores, however large, leaves the chunk scores unchanged,
    where a tiny tie-break term added to raw scores would vanish in float32."""
    torch.manual_seed(2)
    inner = torch.rand(2, 3, 30)
    base = ChunkKV(Fixed(inner), 6).score(_view(2, 3, 30))
    scaled = ChunkKV(Fixed(inner * 1e30 + 1e31), 6).score(_view(2, 3, 30))
    torch.testing.assert_close(scaled, base, rtol=0, atol=0)


def test_infinite_inner_scores():
    seq, c = 12, 3
    inner = torch.zeros(1, 1, seq)
    inner[0, 0, 7] = float("inf")  # chunk 2: on top
    inner[0, 0, 1] = float("-inf")  # chunk 0: at the bottom
    inner[0, 0, 9:12] = torch.tensor([5.0, float("inf"), float("-inf")])  # chunk 3: both, no NaN
    scores = ChunkKV(Fixed(inner), c).score(_view(1, 1, seq))[0, 0]
    assert torch.isfinite(scores).all()
    chunk_rank = scores.view(4, 3).floor()[:, 0].tolist()
    assert chunk_rank[2] == 3 and chunk_rank[0] == 0


def test_protected_chunk_ranks_first_and_wrapping_keeps_protection(kit):
    """SnapKV's window lifts a whole chunk above every other; the chunk straddling it ranks by its mean."""
    rows = [kit.random_row(40, 4, 2, 8)]
    scorer = ChunkKV(SnapKV(window=10), 10)
    layer = kit.build_for(scorer, rows)
    scores = scorer.score(layer)
    # the last 10 tokens are exactly the last chunk: it ranks above all others in every head
    assert (scores[0, :, 30:].amin(-1) > scores[0, :, :30].amax(-1)).all()


def test_name_needs_and_single_token_chunks():
    inner = SnapKV(window=7)
    scorer = ChunkKV(inner, 4)
    assert scorer.name == "snapkv+chunk4"
    assert ChunkKV(Knorm()).name == "knorm+chunk10"
    assert scorer.query_window == 7 and scorer.needs_query_stats is False and scorer.query_stats_skip == 0
    torch.manual_seed(3)
    values = torch.randn(2, 2, 9)
    scores = ChunkKV(Fixed(values), 1).score(_view(2, 2, 9))
    assert torch.equal(scores.argsort(-1), values.argsort(-1))  # chunk_size 1 keeps the inner order


@pytest.mark.parametrize("chunk_size", [0, -2, 2.5, True, "10"])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkKV(Knorm(), chunk_size)
