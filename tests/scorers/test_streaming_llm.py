from __future__ import annotations

import pytest
import torch

from zigzag.scorers import StreamingLLM


def kept_by_reference(positions: list[int], n_sink: int, budget: int) -> set[int]:
    """Indices StreamingLLM keeps: sinks first (position 0 first), then the most recent."""
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    sinks = [i for i in order if positions[i] < n_sink]
    recent = [i for i in reversed(order) if positions[i] >= n_sink]
    return set((sinks + recent)[:budget])


@pytest.mark.parametrize("n_sink", [0, 1, 4, 12])
def test_topk_keeps_sinks_and_recent(kit, n_sink):
    layer = kit.build([kit.random_row(n, 3, 3, 8) for n in (10, 6)], seq=12)
    scores = StreamingLLM(n_sink=n_sink).score(layer)
    assert (scores == scores[:, :1]).all()  # same for every kv head
    for b in range(2):
        idx = layer.valid[b].nonzero().flatten().tolist()
        positions = [int(layer.positions[b, i]) for i in idx]
        for budget in range(1, len(idx) + 1):
            top = scores[b, 0, idx].topk(budget).indices.tolist()
            assert {idx[i] for i in top} == {idx[i] for i in kept_by_reference(positions, n_sink, budget)}


def test_no_sink_is_position():
    from zigzag.scorers import LayerView

    positions = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    layer = LayerView(torch.zeros(2, 1, 5, 4), torch.zeros(2, 1, 5, 4), valid, positions, 0.5)
    scores = StreamingLLM(n_sink=0).score(layer)
    torch.testing.assert_close(scores[1, 0], positions[1].float())
    torch.testing.assert_close(scores[0, 0, 2:], positions[0, 2:].float())
