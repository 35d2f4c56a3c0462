from __future__ import annotations

import torch

from zigzag.scorers import Knorm


def test_knorm_matches_loop(kit):
    layer = kit.build([kit.random_row(n, 6, 2, 16) for n in (11, 7)])
    scores = Knorm().score(layer)
    for b in range(2):
        for h in range(2):
            for t in range(11):
                ref = -sum(float(x) ** 2 for x in layer.keys[b, h, t].double()) ** 0.5
                assert abs(scores[b, h, t].item() - ref) < 1e-5


def test_knorm_bfloat16_scores_are_float32(kit):
    layer = kit.build([kit.random_row(9, 3, 3, 8)], dtype=torch.bfloat16)
    scores = Knorm().score(layer)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, -layer.keys.double().norm(dim=-1).float())
