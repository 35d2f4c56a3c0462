"""The merge rule written plainly: float64, one (row, head) at a time, full similarity matrix.

Slow and memory-hungry (``evicted x kept`` similarities per head), kept as the definition that the
fast paths are tested against.
"""

from __future__ import annotations

import torch

from zigzag.merge.base import MergeResult, check_inputs, check_merge_args, merge_quota


def merge_reference(
    keys: torch.Tensor,
    values: torch.Tensor,
    kept: torch.Tensor,
    valid: torch.Tensor,
    threshold: float = 0.0,
    fraction: float = 1.0,
) -> MergeResult:
    """Fold every evicted token into the survivor whose key is most cosine-similar (float64).

    For one (row, head), with ``S`` the kept, non-padding positions (the *targets*) and ``E`` the
    valid positions not kept:

    1. ``cos(e, s) = k_e . k_s / (|k_e| |k_s|)`` (``0`` when a norm is 0); ``s*(e)`` is the target
       with the largest cosine, ties going to the lowest slot; ``c_e = cos(e, s*(e))``.
    2. Only the ``ceil(fraction * |E|)`` tokens with the largest ``c_e`` may merge (ties: lower
       position first), and only if ``c_e >= threshold``.
    3. ``w_e = max(c_e, 0) * |v_e| / (|v_e| + |v_s|)`` with ``v_s`` the survivor's *original* value
       (``w_e = 0`` when ``|v_e| = 0``).
    4. ``v_s <- (v_s + sum_e w_e v_e) / (1 + sum_e w_e)``; ``count_s = 1 + #{e : w_e > 0}``.

    Args:
        keys: ``(batch, kv_heads, seq, head_dim)`` float, all prefill keys (never modified).
        values: ``(batch, kv_heads, seq, head_dim)`` float, all prefill values (never modified).
        kept: ``(batch, kv_heads, n)`` integer: kept columns of ``seq``, ascending; ``-1`` marks an
            empty slot (empty slots come first).
        valid: ``(batch, seq)`` bool, False on left padding.
        threshold: minimum cosine for a token to merge (default 0: every positive-cosine token).
        fraction: share ``(0, 1]`` of each (row, head)'s evicted tokens that may merge, most similar
            first (default 1: all).

    Returns:
        :class:`MergeResult`: ``values (batch, kv_heads, n, head_dim)`` in ``values.dtype`` (zeros on
        empty slots) and ``counts (batch, kv_heads, n)`` float32 (0 on empty slots).
    """
    kept = check_inputs(keys, values, kept, valid)
    check_merge_args(threshold, fraction)
    batch, kv_heads, seq, head_dim = keys.shape
    n = kept.shape[-1]
    out = torch.zeros(batch, kv_heads, n, head_dim, dtype=torch.float64)
    counts = torch.zeros(batch, kv_heads, n, dtype=torch.float32)
    keys64, values64 = keys.detach().cpu().double(), values.detach().cpu().double()
    kept_cpu, valid_cpu = kept.cpu(), valid.cpu()

    for r in range(batch):
        for h in range(kv_heads):
            slots = [j for j in range(n) if kept_cpu[r, h, j] >= 0]
            kept_pos = {int(kept_cpu[r, h, j]) for j in slots}
            for j in slots:
                out[r, h, j] = values64[r, h, kept_cpu[r, h, j]]
                counts[r, h, j] = 1.0
            targets = [j for j in slots if valid_cpu[r, kept_cpu[r, h, j]]]
            evicted = [p for p in range(seq) if valid_cpu[r, p] and p not in kept_pos]
            if not targets or not evicted:
                continue

            k_s = keys64[r, h, kept_cpu[r, h, targets]]  # (m, head_dim)
            v_s = values64[r, h, kept_cpu[r, h, targets]]  # (m, head_dim)
            k_e = keys64[r, h, evicted]  # (E, head_dim)
            norm_prod = k_e.norm(dim=-1)[:, None] * k_s.norm(dim=-1)[None, :]
            cos = torch.where(norm_prod > 0, (k_e @ k_s.T) / norm_prod, torch.zeros(()).double())  # (E, m)

            best = []  # (c_e, index into targets) per evicted token
            for i in range(len(evicted)):
                row = cos[i].tolist()
                top = max(row)
                best.append((top, row.index(top)))  # first maximum = lowest slot

            order = sorted(range(len(evicted)), key=lambda i: (-best[i][0], evicted[i]))
            chosen = order[: merge_quota(len(evicted), fraction)]

            acc = torch.zeros(len(targets), head_dim, dtype=torch.float64)
            wsum = [0.0] * len(targets)
            absorbed = [0] * len(targets)
            vs_norm = v_s.norm(dim=-1).tolist()
            for i in chosen:
                c, t = best[i]
                if c < threshold or c <= 0:
                    continue
                v_e = values64[r, h, evicted[i]]
                ne = float(v_e.norm())
                if ne == 0.0:
                    continue
                w = c * ne / (ne + vs_norm[t])
                if w > 0:
                    acc[t] += w * v_e
                    wsum[t] += w
                    absorbed[t] += 1
            for t, j in enumerate(targets):
                out[r, h, j] = (v_s[t] + acc[t]) / (1.0 + wsum[t])
                counts[r, h, j] = 1.0 + absorbed[t]

    return MergeResult(values=out.to(device=values.device, dtype=values.dtype), counts=counts.to(values.device))
