"""ObservedAttention against a float64 reference built from the full (seq x seq) causal attention."""

from __future__ import annotations

import pytest
import torch

import zigzag.scorers.observed as observed_module
from zigzag.scorers.observed import ALL_QUERIES, ObservedAttention


def full_attention_reference(layer, window):
    """float64: the whole causal attention matrix of every row and query head, then per key the sum
    over the queries read (the last ``w``) and the number of valid queries read that see it.

    Returns (sums (batch, heads, seq), seen (batch, seq), groups)."""
    keys = layer.keys.double()
    batch, kv_heads, seq, _ = keys.shape
    given = layer.window_queries.double()
    w = given.shape[2] if window is None else min(window, seq)
    heads = given.shape[1]
    groups = heads // kv_heads
    queries = torch.zeros(batch, heads, seq, keys.shape[-1], dtype=torch.float64)
    queries[:, :, seq - w :] = given[:, :, given.shape[2] - w :]
    read = torch.arange(seq) >= seq - w
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()  # [t, j]: query t sees key j <= t
    sums = torch.zeros(batch, heads, seq, dtype=torch.float64)
    seen = torch.zeros(batch, seq, dtype=torch.float64)
    for b in range(batch):
        valid = layer.valid[b]
        counted = read & valid  # the queries that count: read, and not on padding
        visible = causal & valid[None, :]
        for h in range(heads):
            logits = queries[b, h] @ keys[b, h // groups].T * layer.scaling  # (seq, seq)
            probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
            probs = torch.where(counted[:, None], probs, torch.zeros_like(probs))
            sums[b, h] = probs.sum(dim=0)
        for j in range(seq):
            seen[b, j] = sum(1 for t in range(j, seq) if counted[t])
    return sums, seen, groups


def observed_reference(layer, window):
    sums, seen, groups = full_attention_reference(layer, window)
    mean = sums / seen.clamp(min=1)[:, None, :]
    batch, heads, seq = mean.shape
    return mean.view(batch, heads // groups, groups, seq).mean(dim=2)


@pytest.mark.parametrize(
    "lengths,window,block_size",
    [((17, 12), None, 4), ((9, 9), None, 256), ((20, 3, 1), None, 1), ((15, 10), 6, 4), ((11, 7), 30, 3), ((8,), 1, 5)],
)
@pytest.mark.parametrize("groups", [1, 3])
def test_matches_full_attention_reference(kit, lengths, window, block_size, groups):
    kv_heads, head_dim = 2, 8
    rows = [kit.random_row(n, kv_heads * groups, kv_heads, head_dim) for n in lengths]
    scorer = ObservedAttention(window=window, block_size=block_size)
    layer = kit.build_for(scorer, rows)
    scores = scorer.score(layer)
    assert scores.dtype == torch.float32 and scores.shape == (len(rows), kv_heads, layer.seq)
    ref = observed_reference(layer, window)
    valid = layer.valid[:, None, :].expand_as(scores)
    torch.testing.assert_close(scores.double()[valid], ref[valid], rtol=1e-5, atol=1e-7)


def test_divisor_is_kvpress_queries_that_see_the_key(kit):
    """Unpadded, every query read: key j is averaged over the seq - j queries after it (kvpress)."""
    rows = [kit.random_row(10, 4, 2, 8)]
    layer = kit.build_for(ObservedAttention(), rows)
    sums, _, groups = full_attention_reference(layer, None)
    expected = sums / torch.arange(10, 0, -1, dtype=torch.float64)
    expected = expected.view(1, 2, groups, 10).mean(dim=2)
    torch.testing.assert_close(ObservedAttention().score(layer).double(), expected, rtol=1e-5, atol=1e-7)


def test_uniform_attention_closed_form(kit):
    """Zero keys: query t spreads 1 / (t + 1) over keys 0..t, so key j scores mean_{t >= j} 1 / (t + 1)."""
    seq = 12
    rows = [kit.random_row(seq, 3, 1, 4)]
    layer = kit.build_for(ObservedAttention(), rows)
    layer.keys = torch.zeros_like(layer.keys)
    expected = torch.tensor([sum(1 / (t + 1) for t in range(j, seq)) / (seq - j) for j in range(seq)])
    torch.testing.assert_close(ObservedAttention(block_size=5).score(layer)[0, 0], expected.float())


def test_block_size_does_not_change_the_scores(kit):
    rows = [kit.random_row(n, 6, 2, 8) for n in (23, 14)]
    layer = kit.build_for(ObservedAttention(), rows)
    base = ObservedAttention(block_size=1000).score(layer)
    for block_size in (1, 2, 5, 22, 23):
        torch.testing.assert_close(ObservedAttention(block_size=block_size).score(layer), base, rtol=1e-5, atol=1e-7)


def test_blocks_bound_the_memory(kit, monkeypatch):
    """No call sees more than block_size queries: the (seq x seq) attention is never built."""
    calls = []
    real = observed_module.window_mass_sum

    def spy(queries, keys, valid, scaling, padded=True):
        calls.append((queries.shape[2], keys.shape[2]))
        return real(queries, keys, valid, scaling, padded)

    monkeypatch.setattr(observed_module, "window_mass_sum", spy)
    layer = kit.build_for(ObservedAttention(), [kit.random_row(19, 2, 1, 4)])
    ObservedAttention(block_size=4).score(layer)
    assert max(q for q, _ in calls) <= 4
    assert sum(q for q, _ in calls) == 19  # every query exactly once
    assert sorted(calls) == sorted([(4, 19), (4, 15), (4, 11), (4, 7), (3, 3)])


def test_window_none_reads_only_the_queries_given(kit):
    """Chunked prefill may pass the last queries only: window=None then scores like window=n."""
    rows = [kit.random_row(n, 4, 2, 8) for n in (16, 11)]
    partial = kit.build(rows, window=6)
    full = kit.build(rows, window=16)
    torch.testing.assert_close(ObservedAttention().score(partial), ObservedAttention(window=6).score(full))
    # and the window differs from every query: the test can tell them apart
    assert not torch.allclose(ObservedAttention().score(full), ObservedAttention(window=6).score(full))


def test_query_window_and_errors(kit):
    assert ALL_QUERIES == 2**31 - 1
    assert ObservedAttention().query_window == ALL_QUERIES
    assert ObservedAttention(window=9).query_window == 9
    assert ObservedAttention.name == "observed_attention"
    assert ObservedAttention().needs_query_stats is False
    rows = [kit.random_row(12, 4, 2, 8)]
    with pytest.raises(ValueError, match="window_queries"):
        ObservedAttention().score(kit.build(rows))
    with pytest.raises(ValueError, match="window_queries"):
        ObservedAttention(window=8).score(kit.build(rows, window=5))


@pytest.mark.parametrize(
    "kwargs", [{"window": 0}, {"window": -3}, {"window": True}, {"window": 2.0}, {"block_size": 0}, {"block_size": 1.5}]
)
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        ObservedAttention(**kwargs)


@pytest.mark.parametrize("padded", [False, True])
def test_window_mass_kernel_gives_the_torch_result(kit, monkeypatch, padded):
    """Blocks of sliced keys through the Triton kernel (its interpreter on CPU) score as window_attention does."""
    pytest.importorskip("triton")
    import zigzag.scorers.window as window_module

    rows = [kit.random_row(n, 4, 2, 16) for n in ((21, 21) if not padded else (21, 15))]
    layer = kit.build_for(ObservedAttention(), rows)
    layer.padded = padded
    scorer = ObservedAttention(block_size=8)
    monkeypatch.setattr(window_module._MASS_SWITCH, "name", "torch")
    reference = scorer.score(layer)
    monkeypatch.setattr(window_module._MASS_SWITCH, "name", "triton")
    torch.testing.assert_close(scorer.score(layer), reference, rtol=1e-5, atol=1e-6)
