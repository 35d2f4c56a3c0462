"""Every budget allocator against the contract of zigzag.budget.base, from one table.

A new allocator is one row here: the contract (shape by granularity, exact totals, bounds, and for
``"split"`` allocators the head split) is checked on fresh random inputs.
"""

from __future__ import annotations

import pytest
import torch

from zigzag.budget import BUDGETS, AdaKV, DuoAttention, Pyramid, Sensitivity, SimLayerKV, Uniform, ZigZag, ZigZagHeads

BUDGET_TABLE = [
    {"cls": Uniform, "kwargs": {}},
    {"cls": Pyramid, "kwargs": {}},
    {"cls": Pyramid, "kwargs": {"beta": 5.0}},
    {"cls": ZigZag, "kwargs": {}},
    {"cls": ZigZag, "kwargs": {"skip_layers": 2, "max_multiple": 2.0}},
    {"cls": ZigZag, "kwargs": {"gamma": 0.5, "bound_fraction": 0.1}},
    {"cls": AdaKV, "kwargs": {}},
    {"cls": ZigZagHeads, "kwargs": {}},
    {"cls": ZigZagHeads, "kwargs": {"group": "mean", "skip_layers": 1}},
    {"cls": Sensitivity, "kwargs": {"weights": (0.0, 3.0, 1.0, 0.5, 9.0, 2.0)}},
    {"cls": Sensitivity, "kwargs": {"weights": (1.0, 0.0, 0.0, 4.0, 2.0, 2.0), "bound_fraction": 0.0, "gamma": 0.5}},
    {"cls": SimLayerKV, "kwargs": {"threshold": 0.3, "n_initial": 2, "n_recent": 16}},
    {"cls": SimLayerKV, "kwargs": {"threshold": 0.0, "n_initial": 0, "n_recent": 3}},  # every layer lazy
    {
        "cls": DuoAttention,
        "kwargs": {"weights": ((0.0, 3.0), (1.0, 0.5), (9.0, 2.0), (0.1, 0.2), (4.0, 4.0), (0.3, 7.0)), "n_sink": 4, "recent": 8},
    },
    {"cls": DuoAttention, "kwargs": {"weights": ((1.0, 1.0),) * 6}},
]
IDS = [f"{row['cls'].__name__}({','.join(f'{k}={v}' for k, v in row['kwargs'].items())})" for row in BUDGET_TABLE]
LAYERS, KV_HEADS, HEADS = 6, 2, 4


def test_every_registered_budget_is_in_the_table():
    assert set(BUDGETS.values()) <= {row["cls"] for row in BUDGET_TABLE}


@pytest.mark.parametrize("row", BUDGET_TABLE, ids=IDS)
def test_contract(row):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    allocator = row["cls"](**row["kwargs"])
    seq = torch.randint(20, 200, (3,), generator=gen)
    avg = (seq.double() * torch.rand(3, generator=gen, dtype=torch.float64)).floor().long()
    lmba = None
    if allocator.needs_lmba:
        mass = torch.rand(3, HEADS, int(seq.max()), generator=gen)
        valid = torch.arange(int(seq.max()))[None] >= (seq.max() - seq)[:, None]
        mass = (mass * valid[:, None]).softmax(-1) * valid[:, None]
        per_layer = [allocator.measure(mass * (layer + 1) % 1.0 + 1e-3, valid, KV_HEADS) for layer in range(LAYERS)]
        lmba = torch.stack(per_layer, dim=1)
        assert lmba.shape == ((3, LAYERS, KV_HEADS) if allocator.granularity == "head" else (3, LAYERS))
    budgets = allocator.allocate(avg, seq, LAYERS, lmba)
    heads = KV_HEADS if allocator.granularity == "head" else 1
    assert budgets.shape == ((3, LAYERS, KV_HEADS) if heads > 1 else (3, LAYERS)) and budgets.dtype == torch.long
    flat = budgets.reshape(3, -1)
    assert flat.sum(dim=1).tolist() == (LAYERS * heads * avg).tolist()
    assert bool((flat >= 0).all()) and bool((flat <= seq[:, None]).all())
    if allocator.granularity == "split":
        length = int(seq.max())
        valid = torch.arange(length)[None] >= (length - seq)[:, None]
        scores = torch.randn(3, KV_HEADS, length, generator=gen).masked_fill(~valid[:, None], float("-inf"))
        split = allocator.split_heads(scores, valid, budgets[:, 0])
        assert split.shape == (3, KV_HEADS)
        assert split.sum(dim=1).tolist() == (KV_HEADS * budgets[:, 0]).tolist()
        assert bool((split >= 0).all()) and bool((split <= seq[:, None]).all())
