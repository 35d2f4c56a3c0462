"""Shared exact references for the budget tests (rational arithmetic, no torch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction

import pytest

Number = int | float | Fraction


def waterfill(weights: Sequence[Number], total: int, lower: Sequence[int], upper: Sequence[int]) -> list[Fraction]:
    """Exact continuous target of ``apportion``: ``x_i = min(upper_i, lower_i + lam * w_i)``, sum = total.

    Found by iterated clipping in rational arithmetic; entries whose remaining weights are all 0
    share the rest evenly.
    """
    n = len(weights)
    w = [Fraction(v) for v in weights]
    clipped: set[int] = set()
    while True:
        free = [i for i in range(n) if i not in clipped]
        w_sum = sum((w[i] for i in free), Fraction(0))
        eff = {i: (w[i] if w_sum > 0 else Fraction(1)) for i in free}
        eff_sum = w_sum if w_sum > 0 else Fraction(len(free))
        rest = total - sum(lower[i] for i in free) - sum(upper[i] for i in clipped)
        x = [Fraction(upper[i]) if i in clipped else lower[i] + rest * eff[i] / eff_sum for i in range(n)]
        over = [i for i in free if x[i] > upper[i]]
        if not over:
            return x
        clipped |= set(over)


def assert_more_uncertainty_never_fewer_tokens(
    uncertainty: Sequence[float], budgets: Sequence[int], *, tie_slack: int | None = 1, separable: Sequence[float] | None = None
) -> None:
    """For every pair of entries: more ``uncertainty`` never gets fewer tokens, and equal uncertainty
    differs by at most ``tie_slack`` tokens (None: ties are not checked). ``separable``: a second
    ordering that must also put ``i`` above ``j`` before the pair is checked (a transform of the
    uncertainty, where float64 may no longer tell two values apart)."""
    order = uncertainty if separable is None else separable
    for i, (u_i, x_i) in enumerate(zip(uncertainty, budgets)):
        for j, (u_j, x_j) in enumerate(zip(uncertainty, budgets)):
            if u_i > u_j and order[i] > order[j]:
                assert x_i >= x_j, f"entry {i} (uncertainty {u_i}) keeps {x_i} < entry {j} ({u_j}) keeps {x_j}"
            if tie_slack is not None and u_i == u_j:
                assert abs(x_i - x_j) <= tie_slack, f"equal uncertainty {u_i}: entries {i} and {j} keep {x_i} and {x_j}"


@pytest.fixture(scope="session")
def waterfill_ref() -> Callable[..., list[Fraction]]:
    return waterfill
