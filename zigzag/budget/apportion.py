"""Integer apportionment: split an exact integer total into bounded parts proportional to weights.

Every per-layer budget in :mod:`zigzag.budget` goes through :func:`apportion`, so that the budgets
of a row sum *exactly* to ``num_layers * avg_budget`` while each layer stays inside its floor and
its cap. Papers state budgets as real numbers (ZigZagKV, arXiv 2412.09036, Eq. 6; PyramidKV,
arXiv 2406.02069) and leave clipping and rounding implicit; getting those two steps wrong silently
changes the compression ratio.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["apportion"]


def _check_int_like(value: int | torch.Tensor, arg: str) -> torch.Tensor:
    if isinstance(value, bool):
        raise TypeError(f"{arg} must be an int or an integer tensor; got a bool ({value})")
    if isinstance(value, numbers.Integral):
        return torch.tensor(int(value), dtype=torch.long)
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise ValueError(f"{arg} must have an integer dtype; got {value.dtype}")
        return value.long()
    raise TypeError(f"{arg} must be an int or an integer tensor; got {type(value).__name__}")


def _order_free_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in an order that does not depend on the order of the entries.

    Floating-point addition is not associative; summing the sorted values makes the result a
    function of the multiset only, so permuting the layers permutes the allocation bit for bit.
    """
    return torch.sort(x, dim=-1).values.sum(dim=-1)


def _first_k(eligible: torch.Tensor, keys: list[torch.Tensor], k: torch.Tensor) -> torch.Tensor:
    """Per row, mark the first ``k[b]`` eligible entries ranked by ``keys`` (descending), then index.

    Args:
        eligible: ``(batch, n)`` bool.
        keys: ``(batch, n)`` float tensors, most significant first; larger ranks first.
        k: ``(batch,)`` long, how many to mark per row (clipped to the number eligible).

    Returns:
        ``(batch, n)`` bool.
    """
    batch, n = eligible.shape
    # Stable sorts from the least to the most significant key give a lexicographic order; the
    # starting arange makes the lower index win exact ties.
    order = torch.arange(n, device=eligible.device).expand(batch, n)
    for key in reversed(keys):
        step = torch.argsort(key.gather(-1, order), dim=-1, descending=True, stable=True)
        order = order.gather(-1, step)
    step = torch.argsort(eligible.gather(-1, order).to(torch.int8), dim=-1, descending=True, stable=True)
    order = order.gather(-1, step)
    take_sorted = torch.arange(n, device=eligible.device).expand(batch, n) < k[:, None]
    take = torch.zeros_like(eligible)
    take.scatter_(-1, order, take_sorted)
    return take & eligible


def apportion(
    weights: torch.Tensor,
    total: int | torch.Tensor,
    lower: int | torch.Tensor = 0,
    upper: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Split ``total`` into integers ``x`` with ``lower <= x <= upper``, proportional to ``weights``.

    This is the integerization step of per-layer KV budgets (ZigZagKV, Zhong et al., COLING 2025,
    https://arxiv.org/abs/2412.09036, Eq. 6: floors, caps and an exact total; PyramidKV,
    https://arxiv.org/abs/2406.02069). Rows of a 2-D input are independent problems.

    Steps, per row:

    1. Continuous target (water-filling): ``x*_i = min(upper_i, lower_i + lam * w_i)`` with the scalar
       ``lam >= 0`` chosen so that ``sum x* = total``. It is found by iterated clipping: start from
       ``lower + (total - sum lower) * w / sum w``; entries above their cap are fixed at the cap and
       what they free is shared among the others, again in proportion to their weights; repeat
       (at most ``n`` rounds). When the weights of the entries still free are all 0, the rest is
       spread evenly over them (so all-zero weights give an even split).
    2. Integer rounding by largest remainder: every entry gets ``floor(x*_i)`` and the
       ``total - sum floor`` units left go, one each, to the entries with the largest fractional
       parts. Ties go to the larger weight, then to the lower index, so permuting entries with
       distinct weights permutes the result exactly (all sums over entries are taken in sorted order
       for the same reason). The result is always within 1 of ``x*``: ``floor(x*) <= x <= ceil(x*)``.

    Consequences used by the allocators: with equal ``lower`` and equal ``upper`` across a row, a
    larger weight never gets fewer units (``w_i > w_j => x_i >= x_j``), and equal weights give
    allocations that differ by at most 1 (exactly equal when ``total`` allows it).

    Args:
        weights: ``(n,)`` or ``(batch, n)`` real, finite, ``>= 0``. Only ratios matter.
        total: int, or integer tensor ``()`` or ``(batch,)``: the exact sum of each row.
        lower: floors; int or integer tensor broadcastable to ``weights.shape``.
        upper: caps; int or integer tensor broadcastable to ``weights.shape``; None for no cap.

    Returns:
        Long tensor of the shape of ``weights``, on its device.

    Raises:
        ValueError: on negative or non-finite weights, ``lower > upper`` somewhere, or an infeasible
            row (``sum(lower) > total`` or ``sum(upper) < total``).
    """
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor of shape (n,) or (batch, n); got {type(weights).__name__}")
    if weights.dim() not in (1, 2):
        raise ValueError(f"weights must have shape (n,) or (batch, n); got shape {tuple(weights.shape)}")
    if weights.dtype == torch.bool or weights.is_complex():
        raise ValueError(f"weights must be real numbers; got dtype {weights.dtype}")
    squeeze = weights.dim() == 1
    device = weights.device
    w = weights.to(torch.float64)
    if squeeze:
        w = w.unsqueeze(0)
    batch, n = w.shape
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite; got inf or nan")
    if bool((w < 0).any()):
        raise ValueError(f"weights must be >= 0; got a minimum of {w.min().item()}")
    if n > 0:
        # Scale each row by a power of two, which is exact for every weight it does not shrink:
        # rows whose largest weight is below 1 go up to [1, 2) (subnormal weights then carry their
        # full precision), rows above 2 ** 960 go down so that products with the remaining total
        # (< 2 ** 63) cannot overflow; the others stay as they are. Shrinking a row by 2 ** -k would
        # flush its smallest subnormals to 0, and a weight 5e-324 beside a weight 1 must keep its
        # share when the larger is capped. Two factors, because 2 ** 1074 is not a float64.
        _, exponent = torch.frexp(w.max(dim=-1, keepdim=True).values)
        exponent = exponent.to(torch.float64)
        shift = torch.where(exponent < 1, 1 - exponent, torch.where(exponent > 960, 960 - exponent, 0.0))
        half = torch.floor(shift / 2)
        w = w * torch.pow(2.0, half) * torch.pow(2.0, shift - half)

    tot = _check_int_like(total, "total").to(device)
    if tot.dim() > 1 or (tot.dim() == 1 and tot.shape[0] not in (1, batch)):
        raise ValueError(f"total must be an int or have shape () or ({batch},); got shape {tuple(tot.shape)}")
    tot = tot.reshape(-1).expand(batch).clone()

    def bound(value: int | torch.Tensor, arg: str) -> torch.Tensor:
        t = _check_int_like(value, arg).to(device)
        try:
            t = torch.broadcast_to(t, weights.shape)
        except RuntimeError:
            raise ValueError(
                f"{arg} must be an int or broadcastable to weights' shape {tuple(weights.shape)}; "
                f"got shape {tuple(t.shape)}"
            ) from None
        return (t.unsqueeze(0) if squeeze else t).clone()

    lo = bound(lower, "lower")
    lo_sum = lo.sum(dim=-1)
    hi = lo + (tot - lo_sum).clamp_min(0)[:, None] if upper is None else bound(upper, "upper")
    if bool((lo > hi).any()):
        b, i = (lo > hi).nonzero()[0].tolist()
        raise ValueError(
            f"lower must be <= upper everywhere; got lower={lo[b, i].item()} > upper={hi[b, i].item()} "
            f"at index {i}" + ("" if squeeze else f" of row {b}")
        )
    hi_sum = hi.sum(dim=-1)
    for name, bad, limit in (("sum(lower)", lo_sum > tot, lo_sum), ("sum(upper)", hi_sum < tot, hi_sum)):
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            relation = "<=" if name == "sum(lower)" else ">="
            raise ValueError(
                f"infeasible apportionment: need {name} {relation} total; got {name}={limit[b].item()} "
                f"and total={tot[b].item()}" + ("" if squeeze else f" in row {b}")
            )
    if n == 0:
        out = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return out[0] if squeeze else out

    # 1. Water-filling. Each round fixes at least one more entry at its cap, or stops.
    clipped = torch.zeros(batch, n, dtype=torch.bool, device=device)
    lo_f, hi_f = lo.to(torch.float64), hi.to(torch.float64)
    x = lo_f
    for _ in range(n + 1):
        free = ~clipped
        w_free = torch.where(free, w, 0.0)
        w_sum = _order_free_sum(w_free)
        spread_evenly = w_sum <= 0
        eff = torch.where(spread_evenly[:, None], free.to(torch.float64), w_free)
        eff_sum = torch.where(spread_evenly, free.sum(dim=-1).to(torch.float64), w_sum)
        # Only a row with nothing left free has eff_sum 0; its x is all caps, whatever this divides.
        eff_sum = torch.where(eff_sum > 0, eff_sum, 1.0)
        # Integer bookkeeping is exact; only the share of each entry is floating point.
        rest = (tot - torch.where(free, lo, 0).sum(dim=-1) - torch.where(clipped, hi, 0).sum(dim=-1)).to(torch.float64)
        # (rest * w) / sum w: one rounding fewer than rest * (w / sum w), and exact on round inputs.
        x = torch.where(clipped, hi_f, lo_f + (rest[:, None] * eff) / eff_sum[:, None])
        over = free & (x > hi_f)
        if not bool(over.any()):
            break
        clipped |= over
    x = torch.minimum(torch.maximum(x, lo_f), hi_f)

    # 2. Largest remainder.
    floor = torch.floor(x)
    out = floor.long().clamp(min=lo, max=hi)
    remainder = x - floor
    deficit = tot - out.sum(dim=-1)
    # One pass settles it in exact arithmetic (deficit < number of fractional entries); the loop only
    # guards against rounding in x*. Every pass moves at least one unit in each unsettled row,
    # because feasibility guarantees an entry with room.
    while bool((deficit != 0).any()):
        add = _first_k(out < hi, [remainder, w], deficit.clamp_min(0))
        remove = _first_k(out > lo, [-remainder, -w], (-deficit).clamp_min(0))
        out = out + add.long() - remove.long()
        remainder = remainder - add.to(torch.float64) + remove.to(torch.float64)
        deficit = tot - out.sum(dim=-1)
    return out[0] if squeeze else out
