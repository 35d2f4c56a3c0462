"""From scores to kept tokens to a compressed layer: scoring, ranking, keeping, and the one constructor.

Every path that compresses (a whole prefill, layer by layer during the prefill, chunk by chunk) scores
with :func:`score_layer`, ranks with :func:`rank_tokens` (stable: ties keep the earlier column), keeps
with :func:`keep_best` / :func:`select_tokens`, and stores the result with :func:`build_layer` or
:func:`store_layer`, so the same inputs give the same cache whichever path ran.
"""

from __future__ import annotations

import torch

from zigzag.cache import CompressedLayer, VarlenLayer
from zigzag.cache.varlen import heads_differ
from zigzag.kernels.gather import gather_split
from zigzag.kernels.precision import tf32_matmuls
from zigzag.scorers import LayerView, Scorer, window_mass_sum

LOWEST_SCORE = torch.finfo(torch.float32).min
"""What a real token scored ``-inf`` becomes: still below every finite score, but above padding,
which stays ``-inf`` so that it is never kept."""


def score_layer(scorer: Scorer, view: LayerView, nan_seen: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch, kv_heads, seq)`` float32 scores of ``view``: ``-inf`` exactly where ``view.valid`` is False.

    A scorer's ``-inf`` on a real token becomes :data:`LOWEST_SCORE`, so padding always ranks last and
    is never kept, whatever the scorer returned.

    Args:
        nan_seen: a ``()`` bool tensor on the scores' device that is set when the scores hold a NaN
            (checked later, once, without a device sync per layer); None: check here and raise.

    Raises:
        ValueError: the scorer returned NaN (only when ``nan_seen`` is None), or a wrong shape.
    """
    with tf32_matmuls():
        scores = scorer.score(view)
    expected = (view.batch, view.kv_heads, view.seq)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
        raise ValueError(
            f"scorer {scorer.name or type(scorer).__name__} must return a (batch, kv_heads, seq) = {expected} tensor; "
            f"got {tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}"
        )
    scores = scores.float()
    if nan_seen is None:
        if bool(scores.isnan().any()):
            raise ValueError(nan_message(scorer))
    else:
        nan_seen |= scores.isnan().any()
    valid = view.valid[:, None, :] if view.valid.dim() == 2 else view.valid
    return scores.clamp(min=LOWEST_SCORE).masked_fill(~valid, float("-inf"))


def nan_message(scorer: Scorer) -> str:
    return f"scorer {scorer.name or type(scorer).__name__} returned NaN scores; a score must be a number (higher = keep)"


def window_mass(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float, padded: bool = True) -> torch.Tensor:
    """``(batch, heads, seq)``: softmax attention of the ``(batch, heads, w, head_dim)`` last queries over
    ``keys``, averaged over the queries (what ZigZag's LMBA is measured on). ``padded``: see
    :func:`~zigzag.scorers.window_attention`."""
    with tf32_matmuls():
        return window_mass_sum(queries, keys, valid, scaling, padded) / queries.shape[2]


def rank_tokens(scores: torch.Tensor) -> torch.Tensor:
    """``(batch, kv_heads, seq)`` columns from best to worst score; ties keep the earlier column first.

    The stable order is what makes selecting the top ``k`` at once (:func:`select_tokens`) and in
    two steps (top ``k`` now, more once every layer's budget is known) keep exactly the same tokens.
    """
    return scores.sort(dim=-1, descending=True, stable=True).indices


def select_tokens(scores: torch.Tensor, budgets: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Pick each row's ``budgets[b]`` best tokens per KV head.

    Args:
        scores: ``(batch, kv_heads, seq)`` float; ``-inf`` on tokens that must never be kept.
        budgets: ``(batch,)`` or ``(batch, kv_heads)`` long, tokens to keep.
        width: ``budgets.max()`` when the caller has it on the host (saves a device sync), or None.

    Returns:
        ``(batch, kv_heads, max budget)`` long: kept columns in ascending order, ``-1`` on the empty
        slots of rows (heads) whose budget is below the widest; empty slots come first.
    """
    if width is None:
        width = int(budgets.max()) if budgets.numel() else 0
    if width == 0:
        return scores.new_empty(*scores.shape[:2], 0, dtype=torch.long)
    return keep_best(rank_tokens(scores)[..., :width], budgets)[0]


def keep_best(ranked: torch.Tensor, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``budgets`` of best-first columns, as cache slots.

    Args:
        ranked: ``(batch, kv_heads, n)`` long columns, best first, ``n >= budgets.max()``.
        budgets: ``(batch,)`` or ``(batch, kv_heads)`` long.

    Returns:
        ``kept (batch, kv_heads, n)`` long: the kept columns ascending, ``-1`` for the ranks beyond
        each budget (they come first); and ``order (batch, kv_heads, n)``: where in ``ranked`` each
        slot came from (to move keys and values that are stored best first).
    """
    limit = budgets if budgets.dim() == 2 else budgets[:, None]
    used = torch.arange(ranked.shape[-1], device=ranked.device) < limit[..., None].to(ranked.device)
    return torch.where(used, ranked, -1).sort(dim=-1)


def gather_kept(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(batch, kv_heads, seq, head_dim)`` at ``kept (batch, kv_heads, n)``, zeros on -1:
    two ``(batch, kv_heads, n, head_dim)`` tensors (one launch on CUDA, :func:`zigzag.kernels.gather.gather_split`)."""
    return gather_split(keys, values, kept)[:2]


def store_layer(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    *,
    original_length: int,
    row_budgets: torch.Tensor | None = None,
    prefix_bias: torch.Tensor | None = None,
    varlen: bool | None = None,
) -> CompressedLayer | VarlenLayer:
    """The compressed layer holding already gathered slots: the one place that picks the layout.

    Args:
        keys, values: ``(batch, kv_heads, n, head_dim)`` kept keys and values, slot by slot.
        positions: ``(batch, kv_heads, n)`` long ``input_ids`` column of each slot, ascending, ``-1``
            on empty slots (they come first).
        original_length: the uncompressed length (columns of ``input_ids``).
        row_budgets: ``(batch,)`` host tensor of each row's budget when all its KV heads keep that many
            (layer granularity): the dense layout is then known without a device sync.
        prefix_bias: ``(batch, kv_heads, n)`` float added to the slots' logits (merge), or None.
        varlen: whether some row's KV heads keep different counts, when the caller knows; None: read
            it from ``positions`` (a device sync) unless ``row_budgets`` is given.

    Returns:
        A dense :class:`~zigzag.cache.CompressedLayer` when every KV head of a row keeps as many tokens,
        else a :class:`~zigzag.cache.VarlenLayer` storing exactly the kept slots (head-wise budgets).
    """
    if varlen is None:
        varlen = row_budgets is None and heads_differ(positions)
    if varlen:
        return VarlenLayer.from_padded(keys, values, positions, original_length=original_length, prefix_bias=prefix_bias)
    return CompressedLayer(keys, values, positions, original_length=original_length, prefix_bias=prefix_bias, row_budgets=row_budgets)


def build_layer(
    keys: torch.Tensor,
    values: torch.Tensor,
    kept: torch.Tensor,
    valid: torch.Tensor | None = None,
    merger=None,
    *,
    row_budgets: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    original_length: int | None = None,
) -> CompressedLayer | VarlenLayer:
    """The compressed layer that keeps the ``kept`` slots of one layer's ``keys`` / ``values``.

    Args:
        keys, values: ``(batch, kv_heads, slots, head_dim)``: a whole uncompressed layer, or the slots
            a layer held after an earlier chunk.
        kept: ``(batch, kv_heads, n)`` long slot indices from :func:`select_tokens` (ascending, ``-1`` = empty).
        valid: ``(batch, slots)`` bool, False on left padding (padding is never merged); needed with a merger.
        merger: None, or a merge object (:mod:`zigzag.merge`) folding evicted tokens into survivors
            (whole layers only: ``columns`` None).
        row_budgets: as for :func:`store_layer`.
        columns: ``(batch, kv_heads, slots)`` long ``input_ids`` column of each slot (-1 = empty), or
            None when slot ``j`` is column ``j`` (a whole layer).
        original_length: the uncompressed length; default ``slots`` (a whole layer).
    """
    length = keys.shape[2] if original_length is None else original_length
    merged_values, bias = None, None
    if merger is not None:
        if columns is not None or valid is None:
            raise ValueError("merging needs a whole uncompressed layer and its valid mask")
        merged = merger.merge(keys, values, kept, valid)
        merged_values = merged.values
        if getattr(merger, "preserve_mass", False):
            bias = merged.counts.clamp(min=1.0).log()  # empty slots (count 0) are masked anyway
    varlen = row_budgets is None and heads_differ(kept)
    if varlen and columns is None:
        # Straight into the flat layout: no padded (widest head x heads) copy on the way.
        return VarlenLayer.from_full(keys, values, kept, merged_values=merged_values, prefix_bias=bias)
    positions = kept if columns is None else torch.where(kept >= 0, columns.gather(2, kept.clamp(min=0)), -1)
    out_keys, out_values = gather_kept(keys, values, kept)
    if merged_values is not None:
        out_values = merged_values
    return store_layer(
        out_keys, out_values, positions, original_length=length, row_budgets=row_budgets, prefix_bias=bias, varlen=varlen
    )
