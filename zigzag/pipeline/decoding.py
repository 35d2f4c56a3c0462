"""Compression while generating: every ``interval`` appended tokens, every row is cut back to ``max_tokens``.

An event (:func:`compress_event`) sees each layer as the slots it holds, the compressed prefix and the
tokens appended since, and treats them as one more prefill: the scorer scores them (reading the
layer's most recent queries, which the cache recorded), the budget allocator shares
``num_layers * max_tokens`` tokens per row between the layers (and heads), the first ``sinks`` and
the last ``recent`` tokens of each head are always kept, and each layer is rebuilt, dense or varlen,
exactly as after the prompt (:func:`~zigzag.pipeline.select.build_layer`). The rebuilt prefixes stand
for every column so far, so positions and masks go on as before, and the memory of the evicted
tokens is freed. Nothing touches the model: the cache runs the event when transformers asks for the
next forward pass's mask sizes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from zigzag.budget import BudgetAllocator, apportion
from zigzag.cache import CompressedLayer, VarlenLayer, ZigZagCache
from zigzag.cache.decoding import DecodingState
from zigzag.pipeline.capture import WindowRope, values_to_output
from zigzag.pipeline.select import build_layer, nan_message, score_layer, select_tokens, window_mass
from zigzag.scorers import LayerView, Scorer

__all__ = ["STATS_WINDOW", "Decoding", "attach_decoding", "compress_event", "layer_slots"]

STATS_WINDOW = 32
"""Recent queries kept for scorers that read query statistics (ExpectedAttention)."""


@dataclass(frozen=True)
class Decoding:
    """Compression while generating (pass it to :func:`zigzag.compress_cache` as ``decoding=``).

    Attributes:
        max_tokens: tokens each row keeps per KV head, on average over layers, after every event.
        interval: an event runs every ``interval`` appended tokens; between events the cache holds at
            most ``max_tokens + interval`` tokens per KV head on average.
        sinks: the first tokens of every head, always kept (attention sinks).
        recent: the last tokens of every head, always kept.
        scorer: the scorer of the events (a name or an object); None: the prompt's scorer.
        budget: their budget allocator; None: the prompt's.
    """

    max_tokens: int
    interval: int = 128
    sinks: int = 4
    recent: int = 64
    scorer: str | Scorer | None = None
    budget: str | BudgetAllocator | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens", "interval", "sinks", "recent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Decoding.{name} must be an int; got {value!r}")
        if self.interval < 1:
            raise ValueError(f"Decoding.interval must be at least 1; got {self.interval}")
        if self.sinks < 0 or self.recent < 0:
            raise ValueError(f"Decoding.sinks and recent must be >= 0; got {self.sinks}, {self.recent}")
        if self.max_tokens < max(1, self.sinks + self.recent):
            raise ValueError(
                f"Decoding.max_tokens ({self.max_tokens}) must be at least sinks + recent "
                f"({self.sinks} + {self.recent}) and at least 1"
            )


def query_window(scorer: Scorer, allocator: BudgetAllocator) -> int:
    """Recent queries the events need: the scorer's window, LMBA's, and enough for query statistics."""
    return max(
        scorer.query_window,
        allocator.window if allocator.needs_lmba else 0,
        STATS_WINDOW if scorer.needs_query_stats else 0,
    )


def attach_decoding(
    cache: ZigZagCache,
    decoding: Decoding,
    scorer: Scorer,
    allocator: BudgetAllocator,
    *,
    rope,
    scalings: list[float],
    heads: int,
    left_padding: torch.Tensor,
    prompt_length: int,
    output_weights: list[torch.Tensor] | None = None,
) -> None:
    """Make ``cache`` compress while generating.

    Args:
        rope: the model's rotary embedding (:func:`~zigzag.pipeline.hf.rope_fn`).
        scalings: each layer's softmax scale.
        output_weights: each layer's output-projection weight ``(hidden, heads * head_dim)``, for
            scorers that read ``LayerView.output_weight``; None: they get None.
        heads: the model's query heads.
        left_padding: ``(batch,)`` long, padding columns before each row's prompt (RoPE positions are
            columns minus these).
        prompt_length: the cache's length when generation starts (events count steps from it).
    """
    if getattr(scorer, "reconstruction", None) is not None:
        raise ValueError(f"{scorer.name} reads a reconstruction of the context, which no event can repeat")
    if decoding.interval < scorer.query_window:
        raise ValueError(
            f"Decoding.interval ({decoding.interval}) must be at least the {scorer.query_window} last queries "
            f"{scorer.name} reads: an event scores with the queries of the tokens appended since the last one"
        )
    event = functools.partial(
        compress_event, decoding=decoding, scorer=scorer, allocator=allocator, rope=rope, scalings=scalings,
        prompt_length=prompt_length, output_weights=output_weights,
    )  # fmt: skip
    cache.attach_decoding(
        DecodingState(interval=decoding.interval, window=query_window(scorer, allocator), num_layers=len(cache.layers),
                      heads=heads, compress=event, left_padding=left_padding)
    )  # fmt: skip


def layer_slots(layer, tail_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's slots as a dense block: its compressed prefix, then the tokens appended since.

    Args:
        layer: a :class:`~zigzag.cache.CompressedLayer` or :class:`~zigzag.cache.VarlenLayer`.
        tail_valid: ``(batch, appended)`` bool, False on appended padding.

    Returns:
        ``keys, values (batch, kv_heads, slots, head_dim)`` and ``columns (batch, kv_heads, slots)`` long,
        the cache column of each slot, ``-1`` on an empty slot or on padding; ascending where real.
    """
    if layer.prefix_bias is not None:
        raise NotImplementedError("compression while generating does not combine with merge-on-evict yet")
    prefix = layer.kept_positions  # (batch, kv_heads, width), -1 first
    if isinstance(layer, VarlenLayer):
        real = prefix >= 0
        shape = (*prefix.shape, layer.head_dim)
        keys = layer.prefix_keys.new_zeros(shape).index_put_((real,), layer.prefix_keys)
        values = layer.prefix_values.new_zeros(shape).index_put_((real,), layer.prefix_values)
        keys, values = torch.cat([keys, layer.keys], dim=-2), torch.cat([values, layer.values], dim=-2)
    elif isinstance(layer, CompressedLayer):
        keys, values = layer.keys, layer.values
    else:
        raise TypeError(f"cannot compress a {type(layer).__name__} while generating")
    batch, kv_heads = prefix.shape[:2]
    n = layer.appended
    tail = layer.original_length + torch.arange(n, device=prefix.device)
    tail = torch.where(tail_valid.to(prefix.device), tail, -1)[:, None, :].expand(batch, kv_heads, n)
    return keys, values, torch.cat([prefix, tail], dim=-1)


def _query_stats(queries: torch.Tensor, positions: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(batch, heads, d)`` and covariance ``(batch, heads, d, d)`` of the recorded queries with
    their rotation undone, defined as the prefill's (:class:`~zigzag.pipeline.capture.QueryCapture`:
    divided by the count)."""
    pre = WindowRope.at(rope, positions).unrotate(queries.float())
    mean = pre.mean(dim=2)
    centred = pre - mean[:, :, None]
    cov = centred.transpose(-1, -2) @ centred / pre.shape[2]
    return mean, cov


def _last(queries: torch.Tensor | None, count: int) -> torch.Tensor:
    """The last ``count`` recorded queries ``(batch, heads, count, head_dim)``."""
    if queries is None or queries.shape[2] < min(count, 1):
        raise RuntimeError("no queries were recorded before a compression event")
    return queries[..., -count:, :]


def _protect(scores: torch.Tensor, columns: torch.Tensor, sinks: int, recent: int) -> torch.Tensor:
    """``scores`` with ``+inf`` on each head's first ``sinks`` and last ``recent`` real slots."""
    real = columns >= 0
    rank = real.long().cumsum(-1)
    count = rank[..., -1:]
    keep = real & ((rank <= sinks) | (rank > count - recent))
    return scores.masked_fill(keep, float("inf"))


def _fit(raw: torch.Tensor, total: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """``raw (batch, n)`` budgets as they are when they fit ``[lower, upper]``, else shared again in
    proportion to them within those bounds, each row summing to ``total (batch,)``."""
    if bool(((raw >= lower) & (raw <= upper)).all()) and bool((raw.sum(-1) == total).all()):
        return raw
    return apportion(raw.double().clamp_min(1e-9), total, lower=lower, upper=upper)


@torch.no_grad()
def compress_event(
    cache: ZigZagCache,
    *,
    decoding: Decoding,
    scorer: Scorer,
    allocator: BudgetAllocator,
    rope,
    scalings: list[float],
    prompt_length: int,
    output_weights: list[torch.Tensor] | None = None,
) -> None:
    """Cut every row of ``cache`` back to ``decoding.max_tokens`` tokens per KV head on average over
    layers, in place, and record the event in ``cache.events`` (its :class:`DecodingState`)."""
    state = cache.decoding
    layers = cache.layers
    num_layers, batch = len(layers), layers[0].batch
    device = layers[0].keys.device
    length = cache.get_seq_length()
    tail_valid = state.tail_validity(batch, layers[0].appended, device)
    slots = [layer_slots(layer, tail_valid) for layer in layers]
    held = torch.stack([(c >= 0).sum(-1) for _, _, c in slots], dim=1)  # (batch, L, kv_heads)
    kv_heads = held.shape[-1]
    # (batch, L): what a layer can keep per KV head. Head-wise budgets (split or head granularity) give
    # each head up to what it holds, so a layer can keep its heads' mean; layer budgets give every head
    # the same count, so the head that holds least bounds it.
    cap = held.min(dim=-1).values if allocator.granularity == "layer" else held.sum(dim=-1) // kv_heads
    # Layers that hold fewer tokens than their share cap it; what they cannot take goes to the others.
    avg = torch.minimum(torch.full_like(cap[:, 0], decoding.max_tokens), cap.sum(dim=1) // num_layers)
    pad = state.left_padding.to(device)

    views, scores = [], []
    nan_seen = torch.zeros((), dtype=torch.bool, device=device)
    for i, (keys, values, columns) in enumerate(slots):
        valid = (columns >= 0).any(dim=1)
        queries = state.queries[i]
        mean = cov = None
        if scorer.needs_query_stats:
            if queries is None:
                raise RuntimeError("no queries were recorded before a compression event")
            q_pos = (state.query_columns[i][None] - pad[:, None]).clamp_min(0)
            mean, cov = _query_stats(queries, q_pos, rope)
        view = LayerView(
            keys=keys, values=values, valid=valid, positions=(columns.max(dim=1).values - pad[:, None]).clamp_min(0),
            scaling=scalings[i], layer_idx=i, num_layers=num_layers,
            window_queries=None if scorer.query_window == 0 else _last(queries, min(scorer.query_window, keys.shape[2])),
            query_mean=mean, query_cov=cov, rope=rope, padded=True, mean_budget=avg,
            output_weight=None if output_weights is None else values_to_output(output_weights[i], kv_heads, keys.shape[-1]),
        )  # fmt: skip
        s = score_layer(scorer, view, nan_seen).masked_fill(columns < 0, float("-inf"))
        views.append(view)
        scores.append(_protect(s, columns, decoding.sinks, decoding.recent))
    if bool(nan_seen):
        raise ValueError(nan_message(scorer))

    lmba = None
    if allocator.needs_lmba:
        measured = []
        for i, view in enumerate(views):
            q = _last(state.queries[i], min(allocator.window, view.seq))
            mass = window_mass(q, view.keys, view.valid, scalings[i])
            measured.append(allocator.measure(mass, view.valid, kv_heads))
        lmba = torch.stack(measured, dim=1)
    protected = min(decoding.sinks + decoding.recent, decoding.max_tokens)
    if allocator.granularity == "head":
        raw = allocator.allocate(avg, cap.max(dim=1).values, num_layers, lmba).reshape(batch, -1)
        upper = held.reshape(batch, -1)
        budgets = _fit(raw, num_layers * kv_heads * avg, upper.clamp(max=protected), upper).view(
            batch, num_layers, kv_heads
        )
    else:
        raw = allocator.allocate(avg, cap.max(dim=1).values, num_layers, lmba)
        budgets = _fit(raw, num_layers * avg, cap.clamp(max=protected), cap)

    new_layers = []
    for i, (keys, values, columns) in enumerate(slots):
        budget = budgets[:, i]
        if allocator.granularity == "split":
            budget = allocator.split_heads(scores[i], views[i].valid, budget)
            upper = held[:, i]
            budget = _fit(budget, kv_heads * budgets[:, i], upper.clamp(max=protected), upper)
        kept = select_tokens(scores[i], budget)
        layer = build_layer(keys, values, kept, columns=columns, original_length=length)
        layer.decoding = (state, i)
        new_layers.append(layer)
    before = held.float().mean(dim=(1, 2))
    cache.layers[:] = new_layers
    cache.budgets = budgets
    state.events.append({
        "step": length - prompt_length,
        "held_before": before.tolist(),
        "held_after": budgets.float().reshape(batch, -1).mean(-1).tolist(),
        "budgets": budgets.tolist(),
    })  # fmt: skip
