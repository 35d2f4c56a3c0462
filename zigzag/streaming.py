"""Compression during the prefill: each layer is cut down as soon as its attention has run.

:func:`compress_cache` never holds the whole uncompressed cache. A forward hook on every attention
module scores that layer's keys the moment they exist and replaces the layer by its compressed
version, so the uncompressed cache of only one layer is alive at a time.

Allocators that need every layer's statistics before any budget is known (ZigZag's LMBA) get
*provisional* layers: the ``avg_budget`` best tokens of each layer stay on the accelerator and the
rest, already ranked by score, go to host memory (asynchronously, on the compute stream). Once the
last layer is seen the budgets are fixed; layers under the average are trimmed, layers above it fetch
their next best tokens back. Peak accelerator memory is therefore that of uniform budgets.

With ``chunk_size`` the context is also prefilled chunk by chunk: after each chunk every layer keeps
``(1 - ratio)`` of the tokens seen so far, so memory is bounded by the budget plus one chunk,
whatever the context length.

The result equals :meth:`zigzag.api.Prefill.compress` exactly when ``chunk_size`` is None (tested):
scores, budgets and tie-breaking are the same, only the order of work differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from zigzag.pipeline.hf import decoder_of, forward_hooks, query_projection, rope_fn, rotate_half
from zigzag.api import (
    _as_context,
    _check_model,
    _check_ratio,
    _Context,
    _query_window_needed,
    _QueryCapture,
    build_layer,
    gather_kept,
    keep_best,
    prefill_context,
    rank_tokens,
    score_layer,
    select_tokens,
    window_mass,
)
from zigzag.budget import BudgetAllocator, Uniform, get_budget, layer_mean_budgets
from zigzag.cache import CompressedLayer, ZigZagCache
from zigzag.kernels.gather import gather_split
from zigzag.merge import get_merge
from zigzag.scorers import LayerView, Scorer, get_scorer
from zigzag.cache.varlen import VarlenLayer, heads_differ


@dataclass
class _Provisional:
    """One layer waiting for its final budget (LMBA allocators).

    ``top_*``: the ``width`` best tokens of each (row, head) on the accelerator, best first;
    ``rest_*``: all the others, best first, in host memory, rank-major so that fetching the next
    best ``n`` is one contiguous copy. Positions are ``input_ids`` columns.
    """

    top_positions: torch.Tensor  # (batch, kv_heads, width) long
    top_keys: torch.Tensor  # (batch, kv_heads, width, head_dim)
    top_values: torch.Tensor
    rest_positions: torch.Tensor  # (seq - width, batch, kv_heads) long, host
    rest_keys: torch.Tensor  # (seq - width, batch, kv_heads, head_dim), host
    rest_values: torch.Tensor

    def best_positions(self, count: int, device: torch.device) -> torch.Tensor:
        """The ``count`` best positions of each (row, head), best first: ``(batch, kv_heads, count)``."""
        more = count - self.top_positions.shape[-1]
        if more <= 0:
            return self.top_positions[..., :count]
        fetched = self.rest_positions[:more].to(device, non_blocking=True).movedim(0, -1)
        return torch.cat([self.top_positions, fetched], dim=-1)

    def best_states(self, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the ``count`` best tokens, best first: ``(batch, kv_heads, count, head_dim)``."""
        more = count - self.top_positions.shape[-1]
        if more <= 0:
            return self.top_keys[..., :count, :], self.top_values[..., :count, :]
        fetched = self.fetched_states(more, device)
        return tuple(torch.cat([top, rest.movedim(0, -2)], dim=-2) for top, rest in zip((self.top_keys, self.top_values), fetched))

    def fetched_states(self, more: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the next ``more`` best tokens after the top, rank-major as stored:
        ``(more, batch, kv_heads, head_dim)`` on ``device`` (one contiguous copy each)."""
        return self.rest_keys[:more].to(device, non_blocking=True), self.rest_values[:more].to(device, non_blocking=True)

    def best(self, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``count`` best positions, keys and values of each (row, head), best first."""
        return self.best_positions(count, device), *self.best_states(count, device)

    def full(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All positions best first, and the uncompressed ``(batch, kv_heads, seq, head_dim)`` keys and
        values in column order again (merging needs every evicted token)."""
        seq = self.top_positions.shape[-1] + self.rest_positions.shape[0]
        ranked, keys, values = self.best(seq, device)
        order = ranked.argsort(dim=-1)[..., None].expand_as(keys)
        return ranked, keys.gather(2, order), values.gather(2, order)


FINALIZE_RANGE = "zigzag.settle_budgets"
"""Profiler range around the work done once every layer's LMBA is known (fixing budgets, trimming
and fetching back the provisional layers)."""

_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying ``t`` to pinned host memory on a side stream, so the next layers' compute overlaps
    the transfer; :func:`_host_ready` must run before the copy is read."""
    if t.device.type != "cuda":
        return t
    stream = _COPY_STREAMS.setdefault(t.device, torch.cuda.Stream(t.device))
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)  # keep t's memory from being reused before the copy has read it
    return host


def _host_ready(device: torch.device) -> None:
    if device.type == "cuda" and device in _COPY_STREAMS:
        torch.cuda.current_stream(device).wait_stream(_COPY_STREAMS[device])


def _built(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, host_budget: torch.Tensor, seq: int) -> CompressedLayer | VarlenLayer:
    """The final layer of kept slots ``(batch, kv_heads, width)`` (ascending, -1 first) and their keys
    and values; ``host_budget``: ``(batch,)`` layer-wise or ``(batch, kv_heads)`` head-wise budgets."""
    if host_budget.dim() == 1:  # layer-wise budgets: every head of a row keeps as many
        return CompressedLayer(keys, values, kept, original_length=seq, row_budgets=host_budget)
    if heads_differ(kept):  # head-wise budgets: store only the kept slots
        return VarlenLayer.from_padded(keys, values, kept, original_length=seq)
    return CompressedLayer(keys, values, kept, original_length=seq)


@dataclass
class _Slots:
    """What one layer holds when its attention has run in the current chunk.

    keys / values: ``(batch, kv_heads, slots, head_dim)``: the kept tokens of earlier chunks, then
    this chunk's. columns: ``(batch, kv_heads, slots)`` long ``input_ids`` column of each slot (-1 for
    an empty one). valid: ``(batch, kv_heads, slots)`` bool, or ``(batch, slots)`` when every head
    holds the same columns (the first chunk).
    """

    keys: torch.Tensor
    values: torch.Tensor
    columns: torch.Tensor
    valid: torch.Tensor
    padded: bool = True  # False when valid is known to be all True (the first chunk of an unpadded batch)

    @property
    def per_head(self) -> bool:
        return self.valid.dim() == 3


def _fold(t: torch.Tensor | None, kv_heads: int) -> torch.Tensor | None:
    """``(batch, heads, ...)`` -> ``(batch * kv_heads, heads // kv_heads, ...)``: one KV head per row."""
    if t is None:
        return None
    return t.reshape(t.shape[0] * kv_heads, t.shape[1] // kv_heads, *t.shape[2:])


class _LayerwiseCompressor:
    """The hooks' state during the prefill: what has been captured and what each layer became.

    Call :meth:`run_chunk` for consecutive column ranges covering the context, then :meth:`finalize`.
    """

    def __init__(self, model: nn.Module, ctx: _Context, ratio: float, scorer: Scorer, allocator: BudgetAllocator, merger, progress: bool):
        config = model.config
        self.model, self.ctx, self.ratio = model, ctx, ratio
        self.scorer, self.allocator, self.merger = scorer, allocator, merger
        self.attentions = [layer.self_attn for layer in decoder_of(model).layers]
        self.num_layers = len(self.attentions)
        self.heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.window_wanted = _query_window_needed(scorer, allocator)
        self.stats_skip = scorer.query_stats_skip if scorer.needs_query_stats else None
        self.lmba: list[torch.Tensor] = []
        self.pending: dict[int, _Provisional] = {}
        self.cache = DynamicCache(config=config)
        self.rope = None
        self.budgets: torch.Tensor | None = None
        self.pool: torch.Tensor | None = None
        self.bar = tqdm(total=self.num_layers, desc="prefill + compress", disable=not progress)

    # ------------------------------------------------------------------------------------ one chunk

    @torch.no_grad()
    def run_chunk(self, start: int, end: int, final: bool) -> None:
        ctx = self.ctx
        self.start, self.end, self.final = start, end, final
        seen = ctx.valid[:, :end].sum(dim=-1)
        self.avg_budget = ((1.0 - self.ratio) * seen.double()).floor().long()
        held = ctx.valid[:, start:end].sum(dim=-1)  # tokens each head holds after this chunk's attention
        if start > 0:
            held = held + (self.cache.layers[0].kept_positions[:, 0] >= 0).sum(dim=-1)
        self.pool = held.cpu()
        allocator = self.allocator if final else Uniform()  # earlier chunks: every layer keeps the average
        # Everything the layers need from the host is read here, once per chunk: a read inside a layer
        # hook would stall the accelerator until that layer is done.
        self.avg_width = int(self.avg_budget.max())
        self.budgets = None
        if not allocator.needs_lmba:
            self._set_budgets(allocator.allocate(self.avg_budget.cpu(), self.pool, self.num_layers, None))
        self.window = min(self.window_wanted, end - start)
        self.capture = _QueryCapture(
            window=self.window, stats_skip=self.stats_skip, heads=self.heads, head_dim=self.head_dim,
            valid=ctx.valid[:, start:end], padded=ctx.padded,
        )
        self.cos = self.sin = None
        queries = ((query_projection(a), self.capture.hook(i)) for i, a in enumerate(self.attentions))
        after = ((a, self._hook(i)) for i, a in enumerate(self.attentions))
        with forward_hooks(list(queries) + list(after)):
            self.model(
                input_ids=ctx.input_ids[:, start:end],
                attention_mask=ctx.valid[:, :end].long(),
                position_ids=ctx.positions[:, start:end],
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )

    def _set_budgets(self, budgets: torch.Tensor) -> None:
        """``(batch, layers)`` or ``(batch, layers, kv_heads)`` host budgets, and their device copy."""
        self.budgets = budgets
        self.budgets_device = budgets.to(self.ctx.input_ids.device)

    def _hook(self, layer: int):
        def after_attention(module, args, output):
            self._compress_layer(layer)

        return after_attention

    def _slots(self, layer: int) -> _Slots:
        held = self.cache.layers[layer]
        ctx, start, end = self.ctx, self.start, self.end
        if not isinstance(held, CompressedLayer):  # first chunk: a plain layer, every head alike
            columns = torch.arange(end, device=held.keys.device).expand(*held.keys.shape[:3])
            return _Slots(held.keys, held.values, columns, ctx.valid[:, :end], padded=ctx.padded)
        batch, kv_heads = held.keys.shape[:2]
        new = torch.arange(start, end, device=held.keys.device).expand(batch, kv_heads, -1)
        columns = torch.cat([held.kept_positions, new], dim=-1)
        valid = torch.cat([held.kept_positions >= 0, ctx.valid[:, None, start:end].expand(-1, kv_heads, -1)], dim=-1)
        return _Slots(held.keys, held.values, columns, valid)

    def _window_queries(self, layer: int, like: torch.Tensor) -> torch.Tensor | None:
        if self.rope is None:
            self.rope = rope_fn(self.model, like)
        if not self.window:
            return None
        if self.cos is None:
            cos, sin = self.rope(self.ctx.positions[:, self.end - self.window : self.end])
            self.cos, self.sin = cos[:, None], sin[:, None]
        q = self.capture.window_queries.pop(layer)
        return q * self.cos + rotate_half(q) * self.sin

    def _compress_layer(self, layer: int) -> None:
        slots = self._slots(layer)
        queries = self._window_queries(layer, slots.keys)
        scaling = self.attentions[layer].scaling

        def last(count: int) -> torch.Tensor | None:
            count = min(count, self.window)
            return None if count == 0 else queries[:, :, queries.shape[2] - count :]

        kv_heads = slots.keys.shape[1]
        mean, cov = self.capture.mean.pop(layer, None), self.capture.cov.pop(layer, None)
        if slots.per_head:
            # Earlier chunks left each KV head its own tokens: score every (row, KV head) as a row of its own.
            batch = slots.keys.shape[0]
            flat = lambda t: t.reshape(batch * kv_heads, 1, *t.shape[2:])
            valid = slots.valid.reshape(batch * kv_heads, -1)
            positions = self.ctx.positions.gather(1, slots.columns.clamp(min=0).reshape(batch, -1)).reshape(batch * kv_heads, -1)
            view = LayerView(flat(slots.keys), flat(slots.values), valid, positions, scaling, layer, self.num_layers,
                             _fold(last(self.scorer.query_window), kv_heads), _fold(mean, kv_heads), _fold(cov, kv_heads),
                             self.rope if self.scorer.needs_query_stats else None)
            scores = score_layer(self.scorer, view).reshape(batch, kv_heads, -1)
        else:
            view = LayerView(slots.keys, slots.values, slots.valid, self.ctx.positions[:, : self.end], scaling, layer,
                             self.num_layers, last(self.scorer.query_window), mean, cov,
                             self.rope if self.scorer.needs_query_stats else None, padded=slots.padded)
            scores = score_layer(self.scorer, view)
        seq = self.end
        if self.budgets is not None:
            layer_budget, host_budget = self.budgets_device[:, layer], self.budgets[:, layer]
            if self.final and hasattr(self.allocator, "split_heads"):  # head-wise inside the layer (AdaKV)
                layer_budget, host_budget = self.allocator.split_heads(scores, slots.valid, layer_budget), None
                kept = select_tokens(scores, layer_budget)
            else:
                kept = select_tokens(scores, layer_budget, width=int(host_budget.max()))
            row_budgets = host_budget if host_budget is not None and host_budget.dim() == 1 else None
            if not slots.per_head:
                merger = self.merger if self.final else None
                self.cache.layers[layer] = build_layer(slots.keys, slots.values, kept, slots.valid, merger, row_budgets=row_budgets)
            else:
                columns = torch.where(kept >= 0, slots.columns.gather(2, kept.clamp(min=0)), -1)
                self.cache.layers[layer] = CompressedLayer(
                    *gather_kept(slots.keys, slots.values, kept), columns, original_length=seq, row_budgets=row_budgets
                )
        else:
            window_queries = last(self.allocator.window)
            mass = window_mass(
                _fold(window_queries, kv_heads) if slots.per_head else window_queries, view.keys, view.valid, scaling, view.padded
            )
            if getattr(self.allocator, "head_wise", False):  # per-KV-head LMBA (zigzag_heads): (batch, kv_heads)
                measured = self.allocator.measure_heads(mass, view.valid, 1 if slots.per_head else kv_heads)
                self.lmba.append(measured.reshape(scores.shape[0], kv_heads))
            else:
                measured = self.allocator.measure(mass, view.valid)
                self.lmba.append(measured.reshape(scores.shape[0], -1).mean(dim=1) if slots.per_head else measured)
            ranked = rank_tokens(scores)
            width = self.avg_width
            top_keys, top_values, rest_keys, rest_values = gather_split(slots.keys, slots.values, ranked, width)
            columns = slots.columns.gather(2, ranked)
            self.pending[layer] = _Provisional(
                top_positions=columns[..., :width],
                top_keys=top_keys,
                top_values=top_values,
                rest_positions=_to_host(columns[..., width:].permute(2, 0, 1).contiguous()),
                rest_keys=_to_host(rest_keys),
                rest_values=_to_host(rest_values),
            )
            # Nothing reads this layer again during the forward: hold no copy until the budgets are known.
            self.cache.layers[layer] = DynamicLayer()
        if self.final:
            self.bar.update(1)

    # ------------------------------------------------------------------------------------ the end

    def finalize(self) -> ZigZagCache:
        self.bar.close()
        lmba = None
        if self.budgets is None:
            lmba = torch.stack(self.lmba, dim=1).cpu()  # waits for the forward pass
            # A named range, so that profiles (benchmarks/perf/profile.py) show what the budgets cost.
            with torch.profiler.record_function(FINALIZE_RANGE):
                self._settle(lmba)
        budgets = self.budgets
        if budgets.dim() == 3:  # head-wise allocator: report per layer (mean per KV head, exact row totals)
            budgets, lmba = layer_mean_budgets(budgets), lmba.mean(dim=-1)
        return ZigZagCache(self.cache.layers, budgets=budgets, lmba=lmba)

    def _settle(self, lmba: torch.Tensor) -> None:
        """Fix the budgets from every layer's LMBA and cut each provisional layer to its own."""
        ctx = self.ctx
        # A layer can keep at most what it holds (all the row's tokens, unless chunks were cut already).
        self._set_budgets(self.allocator.allocate(self.avg_budget.cpu(), self.pool, self.num_layers, lmba))
        device = ctx.input_ids.device
        _host_ready(device)
        # Python numbers from two host reductions: per-layer tensor checks cost the host more than the work.
        per_layer = self.budgets.transpose(0, 1).reshape(self.num_layers, -1)
        widths, least = per_layer.amax(dim=1).tolist(), per_layer.amin(dim=1).tolist()
        # Shrink first, grow after: the cache never holds more than its final size plus one layer.
        order = sorted(range(self.num_layers), key=lambda i: widths[i] > self.avg_width)
        if self.merger is None:
            self._settle_sorted_once(order, widths, least, device)
            return
        for i in order:
            pending = self.pending.pop(i)
            budget, host_budget = self.budgets_device[:, i], self.budgets[:, i]
            ranked, keys, values = pending.full(device)
            kept = keep_best(ranked[..., : widths[i]], budget)[0]
            row_budgets = host_budget if host_budget.dim() == 1 else None
            self.cache.layers[i] = build_layer(keys, values, kept, ctx.valid, self.merger, row_budgets=row_budgets)

    def _settle_sorted_once(self, order: list[int], widths: list[int], least: list[int], device: torch.device) -> None:
        """Every layer's kept positions in ascending order from one sort, then each layer's keys and values.
        ``widths`` / ``least``: each layer's largest and smallest budget over rows (and heads).

        Row ``(layer, b, h)`` of a ``(layers, batch, kv_heads, span)`` slab holds that head's best
        ``budget`` positions and ``-1`` elsewhere; sorted, each row ends with its kept positions,
        ascending, after the ``-1`` (the empty slots of :func:`~zigzag.api.keep_best`, which come
        first). One sort instead of one per layer: each costs a dozen launches of the host's time,
        while the accelerator waits (this runs after the forward pass, with nothing left to overlap).
        """
        seq = self.ctx.input_ids.shape[1]
        first = self.pending[order[0]].top_positions
        span = max(widths)
        # int32 positions: half the memory and half the radix passes of int64 (positions < 2**31).
        slab = torch.full((self.num_layers, *first.shape[:2], span), -1, dtype=torch.int32, device=device)
        for i in order:  # positions only: keys and values come one layer at a time, below
            width = widths[i]
            candidates = self.pending[i].best_positions(width, device)
            if least[i] < width:  # rows (heads) with fewer: their extra ranks go
                budget = self.budgets_device[:, i].reshape(*self.budgets.shape[:1], -1, 1)
                candidates = torch.where(torch.arange(width, device=device) < budget, candidates, -1)
            slab[i, ..., :width] = candidates
        kept_all, index_all = slab.sort(dim=-1)
        for i in order:
            width = widths[i]
            kept = kept_all[i, ..., span - width :].long()
            index = index_all[i, ..., span - width :]
            pending = self.pending.pop(i)
            more = width - pending.top_positions.shape[-1]
            if least[i] < width:
                index = torch.where(kept >= 0, index, -1)
            if more > 0 or least[i] < width:
                # Fetched tokens are read where they land (gather_split's second source), not concatenated first.
                extra = pending.fetched_states(more, device) if more > 0 else None
                keys, values = gather_split(pending.top_keys, pending.top_values, index, None, extra)[:2]
            else:
                # No empty slot and nothing fetched: two plain gathers. Triton's Python launcher binds about 30
                # arguments per call; under cProfile on the H100 its 32 launches took 4 ms of the settle's host time.
                index = index[..., None].expand(*index.shape, pending.top_keys.shape[-1])
                keys, values = pending.top_keys.gather(2, index), pending.top_values.gather(2, index)
            self.cache.layers[i] = _built(keys, values, kept, self.budgets[:, i], seq)

def _chunk_bounds(seq: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """Column ranges covering ``seq``; the last chunk is full, the first takes the remainder."""
    if chunk_size is None or chunk_size >= seq:
        return [(0, seq)]
    ends = list(range(seq, 0, -chunk_size))[::-1]
    return [(0 if k == 0 else ends[k - 1], end) for k, end in enumerate(ends)]


@torch.no_grad()
def compress_cache(
    model: nn.Module,
    inputs,
    ratio: float,
    scorer: str | Scorer = "snapkv",
    budget: str | BudgetAllocator = "zigzag",
    *,
    merge=None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> ZigZagCache:
    """Prefill ``inputs`` and return a compressed cache that keeps ``1 - ratio`` of it.

    Each layer is compressed right after its attention ran, so the whole uncompressed cache never
    exists (see the module docstring); the result is the same as ``prefill_context(model,
    inputs).compress(ratio, scorer, budget, merge=merge)``.

    Args:
        model: a Hugging Face causal LM (Llama, Mistral without sliding window, Qwen2, Qwen3) using
            ``"sdpa"`` or ``"eager"`` attention. It is left exactly as it was.
        inputs: tokenizer output (``input_ids`` and optional ``attention_mask``, ``(batch, seq)``,
            left padded) or a ``(batch, seq)`` / ``(seq,)`` LongTensor of ids.
        ratio: fraction of the cache removed, in ``[0, 1)``. Row ``b`` (``T_b`` real tokens) keeps
            ``num_layers * int((1 - ratio) * T_b)`` tokens per KV head, shared across layers by ``budget``.
        scorer: a name from ``zigzag.scorers.SCORERS`` or a scorer object (higher score = keep).
        budget: a name from ``zigzag.budget.BUDGETS`` or an allocator object.
        merge: None (evicted tokens are dropped), ``"cosine"`` (the NOTES.md rule) or a merge object
            such as ``CosineMerge(threshold=0.2, preserve_mass=True)``: evicted tokens are folded into
            the most similar survivor's value; with ``preserve_mass``, attention adds ``log(count)``
            to each survivor's logit.
        chunk_size: prefill at most this many tokens per forward pass. After each chunk every layer
            is cut back to ``(1 - ratio)`` of the tokens seen so far (uniformly: the allocator only
            shares the last chunk's budget, between what the layers then hold), so peak memory is
            the budget plus one chunk, not the context. Scorers see each chunk's own queries. None
            (default): one pass, and the result equals ``prefill_context(...).compress(...)``.
        progress: show a progress bar over layers.

    Scorers that reconstruct the context (:class:`~zigzag.scorers.KVzip`) need the whole context
    cached before any layer can be scored: for them this runs ``prefill_context(...,
    reconstruction=scorer.reconstruction).compress(...)``, and peak memory is the full cache.

    Returns:
        A :class:`~zigzag.cache.ZigZagCache`. Continue with ``model.generate(input_ids=cat(context,
        question), attention_mask=..., past_key_values=cache)``: positions continue from ``seq``.
    """
    ratio = _check_ratio(ratio)
    scorer = get_scorer(scorer)
    allocator = get_budget(budget)
    merger = get_merge(merge)
    _check_model(model)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    repeat = getattr(scorer, "reconstruction", None)
    if repeat is not None:
        # Reconstruction needs the whole context cached before any layer can be scored.
        if chunk_size is not None:
            raise ValueError(f"{scorer.name} (context reconstruction) cannot be combined with chunk_size")
        skip = scorer.query_stats_skip if scorer.needs_query_stats else None
        pre = prefill_context(
            model, inputs, window=_query_window_needed(scorer, allocator), query_stats_skip=skip,
            reconstruction=repeat, progress=progress,
        )
        return pre.compress(ratio, scorer, allocator, merge=merger, progress=progress)
    ctx = _as_context(inputs, next(model.parameters()).device)
    bounds = _chunk_bounds(ctx.input_ids.shape[1], chunk_size)
    if len(bounds) > 1:
        if merger is not None:
            raise ValueError("merge is not supported with chunk_size yet: merge after an unchunked prefill")
        wanted = _query_window_needed(scorer, allocator)
        if chunk_size < wanted:
            raise ValueError(
                f"chunk_size must be at least the {wanted} last queries {scorer.name} / {allocator.name} read; got {chunk_size}"
            )
        if hasattr(allocator, "split_heads"):
            raise ValueError(f"budget {allocator.name!r} (head-wise) is not supported with chunk_size yet")
    work = _LayerwiseCompressor(model, ctx, ratio, scorer, allocator, merger, progress)
    for k, (start, end) in enumerate(tqdm(bounds, desc="chunks", disable=not progress or len(bounds) == 1)):
        work.run_chunk(start, end, final=k == len(bounds) - 1)
    return work.finalize()
