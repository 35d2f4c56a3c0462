from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from zigzag.scorers import ExpectedAttention


def rotation_matrix(t: int, d: int) -> torch.Tensor:
    """RoPE at position t as an explicit (d, d) matrix: 2x2 rotations of the pairs (i, i + d/2)."""
    half = d // 2
    R = torch.zeros(d, d, dtype=torch.float64)
    for i in range(half):
        angle = t / 10000.0 ** (2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        R[i, i], R[i, i + half], R[i + half, i], R[i + half, i + half] = c, -s, s, c
    return R


def ea_reference(layer, n_future: int, epsilon: float, use_vnorm: bool) -> torch.Tensor:
    """float64: rotate mu by each future position and average; average the rotation matrices for
    the covariance; z = (Rbar mu).k s + k^T Rbar S Rbar^T k s^2 / 2; softmax over valid tokens;
    mean over the group; (p + eps) ||v||. No sink protection."""
    keys = layer.keys.double()
    batch, kv_heads, seq, d = keys.shape
    mu, S = layer.query_mean.double(), layer.query_cov.double()
    heads = mu.shape[1]
    groups = heads // kv_heads
    s = layer.scaling
    out = torch.zeros(batch, kv_heads, seq, dtype=torch.float64)
    for b in range(batch):
        last = int(layer.positions[b][layer.valid[b]].max())
        rotations = [rotation_matrix(t, d) for t in range(last + 1, last + n_future + 1)]
        Rbar = sum(rotations) / n_future
        seen = [j for j in range(seq) if layer.valid[b, j]]
        for h in range(heads):
            mu_future = sum(R @ mu[b, h] for R in rotations) / n_future
            cov_future = Rbar @ S[b, h] @ Rbar.T
            k = keys[b, h // groups]
            z = [float(mu_future @ k[j]) * s + float(k[j] @ cov_future @ k[j]) * s * s / 2 for j in seen]
            top = max(z)
            exps = [math.exp(v - top) for v in z]
            for j, e in zip(seen, exps):
                out[b, h // groups, j] += e / sum(exps) / groups
    if use_vnorm:
        out = (out + epsilon) * layer.values.double().norm(dim=-1)
    return out


def test_rotation_matrix_is_the_test_rope(kit):
    x = torch.randn(3, 16, dtype=torch.float64)
    for t in (0, 5, 77):
        torch.testing.assert_close(x @ rotation_matrix(t, 16).T, kit.apply_rope(x[:, None], torch.tensor([t]))[:, 0])


@pytest.mark.parametrize(
    "kwargs,lengths,groups,kv_heads,head_dim,chunk,dtype",
    [
        ({"n_future": 7, "n_sink": 2}, (12, 8), 3, 2, 8, None, torch.float32),
        ({"n_future": 1, "n_sink": 0, "use_vnorm": False}, (10,), 1, 2, 8, None, torch.float32),
        ({"n_future": 40, "n_sink": 3, "epsilon": 0.0}, (9, 9, 5), 2, 2, 8, None, torch.float32),
        # several chunks, the last one short, over keys sliced out of a longer float32 tensor
        ({"n_future": 16, "n_sink": 1}, (23, 17), 4, 3, 16, 5, torch.float32),
        # half-precision keys and statistics, as a bfloat16 model caches them
        ({"n_future": 9, "n_sink": 2}, (14, 11), 4, 2, 16, 4, torch.bfloat16),
    ],
)
def test_expected_attention_matches_direct_evaluation(
    kit, monkeypatch, kwargs, lengths, groups, kv_heads, head_dim, chunk, dtype
):
    """Fresh random inputs on every run, checked against a float64 evaluation of the definition."""
    import zigzag.scorers.expected_attention as ea

    if chunk is not None:
        monkeypatch.setattr(ea, "_CHUNK", chunk)
    rows = [kit.random_row(n, kv_heads * groups, kv_heads, head_dim) for n in lengths]
    scorer = ExpectedAttention(**kwargs)
    layer = kit.build_for(scorer, rows, dtype=dtype)
    scores = scorer.score(layer).double()
    ref = ea_reference(layer, scorer.n_future, scorer.epsilon, scorer.use_vnorm)
    for b in range(len(rows)):
        valid = layer.valid[b]
        sinks = valid & (layer.positions[b] < scorer.n_sink)
        others = valid & ~sinks
        torch.testing.assert_close(scores[b][:, others], ref[b][:, others], rtol=1e-4, atol=1e-6)
        if sinks.any():
            assert (scores[b][:, sinks].amin(-1) >= scores[b][:, others].amax(-1) + 1 - 1e-6).all()


def test_no_covariance_one_future_step_is_real_attention(kit):
    """With S = 0 and n_future = 1 the score is the attention of the query mu placed at last + 1."""
    kv_heads, groups, d = 1, 2, 16
    scorer = ExpectedAttention(n_future=1, n_sink=0, use_vnorm=False)
    layer = kit.build_for(scorer, [kit.random_row(13, kv_heads * groups, kv_heads, d)])
    layer = dataclasses.replace(layer, query_cov=torch.zeros_like(layer.query_cov))
    q = kit.apply_rope(layer.query_mean.double()[0][:, None], torch.tensor([13]))[:, 0]  # (heads, d)
    probs = torch.softmax(q @ layer.keys.double()[0, 0].T * layer.scaling, dim=-1).mean(0)
    torch.testing.assert_close(scorer.score(layer)[0, 0].double(), probs, rtol=1e-5, atol=1e-7)


def test_needs_stats_and_full_rotary(kit):
    scorer = ExpectedAttention(n_future=4)
    assert scorer.needs_query_stats and scorer.query_stats_skip == 4 and scorer.query_window == 0
    rows = [kit.random_row(10, 2, 2, 8)]
    with pytest.raises(ValueError):
        scorer.score(kit.build(rows))
    layer = kit.build_for(scorer, rows)
    partial = dataclasses.replace(layer, rope=lambda p: kit.rope_cos_sin(p, 4))
    with pytest.raises(ValueError):
        scorer.score(partial)


def test_long_sequence_is_chunked(kit, monkeypatch):
    """Keys are processed in chunks; the result does not depend on the chunk size."""
    import zigzag.scorers.expected_attention as ea

    scorer = ExpectedAttention(n_future=8)
    layer = kit.build_for(scorer, [kit.random_row(n, 4, 2, 8) for n in (50, 37)])
    whole = scorer.score(layer)
    monkeypatch.setattr(ea, "_CHUNK", 7)
    torch.testing.assert_close(scorer.score(layer), whole, rtol=1e-6, atol=1e-7)


def test_strided_keys_score_like_contiguous_ones(kit, monkeypatch):
    """Keys that are a view of a (batch, seq, kv_heads, head_dim) buffer give the same scores."""
    import zigzag.scorers.expected_attention as ea

    monkeypatch.setattr(ea, "_CHUNK", 6)
    scorer = ExpectedAttention(n_future=8)
    layer = kit.build_for(scorer, [kit.random_row(n, 6, 3, 8) for n in (20, 13)])
    strided = layer.keys.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    torch.testing.assert_close(
        scorer.score(dataclasses.replace(layer, keys=strided)), scorer.score(layer), rtol=1e-6, atol=1e-7
    )
