"""Compression during the prefill: each layer is cut down as soon as its attention has run.

:class:`LayerwiseCompressor` never holds the whole uncompressed cache. A forward hook on every
attention module scores that layer's keys the moment they exist and replaces the layer by its
compressed version, so the uncompressed cache of only one layer is alive at a time.

Budgets come from one :class:`~zigzag.pipeline.plan.BudgetPlan` per forward pass. When the allocator
needs every layer's LMBA first (ZigZag), the layers are parked as
:class:`~zigzag.pipeline.offload.Provisional` until the last one is seen, then settled.

With chunks, the context is prefilled chunk by chunk: after each chunk every layer keeps
its share of the tokens seen so far (``(1 - ratio)`` of them, or at most ``max_tokens``; uniformly:
the allocator shares the last chunk's budget),
so memory is bounded by the budget plus one chunk, whatever the context length.

Without chunks the result equals :meth:`zigzag.pipeline.full.Prefill.compress` exactly (tested):
scores, budgets and tie-breaking are the same, only the order of work differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from zigzag.budget import BudgetAllocator, Uniform
from zigzag.cache import CompressedLayer, ZigZagCache
from zigzag.kernels.gather import gather_split
from zigzag.pipeline.capture import (
    QueryCapture,
    Slots,
    WindowRope,
    fold_heads,
    layer_view,
    query_stats_skip,
    query_window_needed,
)
from zigzag.pipeline.hf import (
    attention_modules,
    forward_hooks,
    output_projection,
    query_projection,
    query_shape,
    rope_fn,
    run_model,
)
from zigzag.pipeline.inputs import Context, Keep
from zigzag.pipeline.offload import HostParking, Provisional, parked_sizes
from zigzag.pipeline.plan import BudgetPlan
from zigzag.pipeline.select import (
    build_layer,
    keep_best,
    nan_message,
    rank_tokens,
    score_layer,
    select_tokens,
    store_layer,
    window_mass,
)
from zigzag.scorers import Scorer

FINALIZE_RANGE = "zigzag.settle_budgets"
"""Profiler range around the work done once every layer's LMBA is known (fixing budgets, trimming
and fetching back the provisional layers)."""


def chunk_bounds(seq: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """Column ranges covering ``seq``; the last chunk is full, the first takes the remainder."""
    if chunk_size is None or chunk_size >= seq:
        return [(0, seq)]
    ends = list(range(seq, 0, -chunk_size))[::-1]
    return [(0 if k == 0 else ends[k - 1], end) for k, end in enumerate(ends)]


@dataclass
class _Chunk:
    """One forward pass over columns ``start:end`` of the context: its plan and its captured queries."""

    start: int
    end: int
    final: bool
    plan: BudgetPlan
    capture: QueryCapture
    mean_budget: torch.Tensor  # (batch,) long, plan.avg_budget on the device, for every layer's view
    avg_width: int  # plan.avg_width: slots a provisional layer keeps on the device
    rope: WindowRope | None = None  # of the window's positions, computed by the first layer that needs it


class LayerwiseCompressor:
    """The hooks' state during the prefill: what has been captured and what each layer became.

    Call :meth:`run_chunk` for consecutive column ranges covering the context, then :meth:`finalize`.
    """

    def __init__(
        self, model: nn.Module, ctx: Context, keep: Keep, scorer: Scorer, allocator: BudgetAllocator, merger, progress: bool
    ):
        self.model, self.ctx, self.keep = model, ctx, keep
        self.scorer, self.allocator, self.merger = scorer, allocator, merger
        self.attentions = attention_modules(model)
        self.num_layers = len(self.attentions)
        self.heads, self.kv_heads, self.head_dim = query_shape(model.config)
        self.window_wanted = query_window_needed(scorer, allocator)
        self.stats_skip = query_stats_skip(scorer)
        self.cache = DynamicCache(config=model.config)
        self.rope = None  # the model's rotary embedding, bound to the keys' dtype by the first layer
        self.pending: dict[int, Provisional] = {}
        self.parking: HostParking | None = None  # the pending layers' host memory (CUDA), opened by the first to park
        self.nan_seen = torch.zeros((), dtype=torch.bool, device=ctx.input_ids.device)
        self.chunk: _Chunk | None = None
        self.bar = tqdm(total=self.num_layers, desc="prefill + compress", disable=not progress)

    # ------------------------------------------------------------------------------------ one chunk

    @torch.no_grad()
    def run_chunk(self, start: int, end: int, final: bool) -> None:
        ctx = self.ctx
        held = ctx.valid[:, start:end].sum(dim=-1)  # tokens each head holds after this chunk's attention
        if start > 0:
            held = held + (self.cache.layers[0].kept_positions[:, 0] >= 0).sum(dim=-1)
        # Earlier chunks: every layer keeps the average. Everything the layers need from the host is
        # read here, once per chunk: a read inside a layer hook would stall the accelerator.
        plan = BudgetPlan.start(
            self.allocator if final else Uniform(), self.keep.per_layer(ctx.valid[:, :end].sum(dim=-1)), held,
            num_layers=self.num_layers, kv_heads=self.kv_heads, device=ctx.input_ids.device,
        )  # fmt: skip
        capture = QueryCapture(
            window=min(self.window_wanted, end - start), stats_skip=self.stats_skip, heads=self.heads,
            head_dim=self.head_dim, valid=ctx.valid[:, start:end], padded=ctx.padded,
        )  # fmt: skip
        # Copied here, not in each layer: a blocking host-to-device copy waits for the stream to drain.
        mean_budget = plan.avg_budget.to(ctx.input_ids.device)
        self.chunk = _Chunk(start, end, final, plan, capture, mean_budget, plan.avg_width)
        queries = [(query_projection(a), capture.hook(i)) for i, a in enumerate(self.attentions)]
        after = [(a, self._hook(i)) for i, a in enumerate(self.attentions)]
        try:
            with forward_hooks(queries + after):
                run_model(
                    self.model, self.cache, input_ids=ctx.input_ids[:, start:end], attention_mask=ctx.valid[:, :end].long(),
                    position_ids=ctx.positions[:, start:end], use_cache=True, logits_to_keep=1,
                )  # fmt: skip
        except BaseException:
            self.close()  # no finalize will come: the parked memory goes back now
            raise

    def _hook(self, layer: int):
        def after_attention(module, args, output):
            self._compress_layer(layer)

        return after_attention

    def _slots(self, layer: int) -> Slots:
        held = self.cache.layers[layer]
        ctx, chunk = self.ctx, self.chunk
        if not isinstance(held, CompressedLayer):  # first chunk: a plain layer, every head alike
            return Slots(held.keys, held.values, None, ctx.valid[:, : chunk.end], padded=ctx.padded)
        batch, kv_heads = held.keys.shape[:2]
        new = torch.arange(chunk.start, chunk.end, device=held.keys.device).expand(batch, kv_heads, -1)
        columns = torch.cat([held.kept_positions, new], dim=-1)
        valid = torch.cat([held.kept_positions >= 0, ctx.valid[:, None, chunk.start : chunk.end].expand(-1, kv_heads, -1)], dim=-1)
        return Slots(held.keys, held.values, columns, valid)

    def _compress_layer(self, layer: int) -> None:
        chunk, ctx = self.chunk, self.ctx
        slots = self._slots(layer)
        if self.rope is None:
            self.rope = rope_fn(self.model, slots.keys)
        if chunk.capture.window and chunk.rope is None:
            chunk.rope = WindowRope.at(self.rope, ctx.positions[:, chunk.end - chunk.capture.window : chunk.end])
        queries = chunk.capture.take(layer, chunk.rope)
        scaling = self.attentions[layer].scaling
        view = layer_view(
            self.scorer, slots, queries, ctx.positions, scaling=scaling, layer_idx=layer, num_layers=self.num_layers,
            rope=self.rope, output_weight=output_projection(self.attentions[layer]).weight,
            mean_budget=chunk.mean_budget,
        )  # fmt: skip
        scores = score_layer(self.scorer, view, self.nan_seen).reshape(*slots.keys.shape[:3])
        plan = chunk.plan
        if plan.known:
            budget = plan.layer(layer, scores, slots.valid)
            kept = select_tokens(scores, budget.device, budget.width)
            self.cache.layers[layer] = build_layer(
                slots.keys, slots.values, kept, slots.valid, self.merger if chunk.final else None,
                row_budgets=budget.row_budgets, columns=slots.columns, original_length=chunk.end,
            )  # fmt: skip
        else:
            window = queries.last(plan.window)
            mass = window_mass(fold_heads(window, self.kv_heads) if slots.per_head else window, view.keys, view.valid, scaling, view.padded)
            # Without padding the mask is all True: measure skips a masked copy of the mass (the same LMBA).
            plan.record_lmba(mass, view.valid if view.padded else None, folded=slots.per_head)
            ranked = rank_tokens(scores)
            columns = ranked if slots.columns is None else slots.columns.gather(2, ranked)
            if not self.pending:  # the first to park: every layer parks as many slots (earlier chunks were uniform)
                self.parking = HostParking.open(slots.keys.device, parked_sizes(slots.keys, chunk.avg_width) * self.num_layers)
            self.pending[layer] = Provisional.park(slots.keys, slots.values, columns, ranked, chunk.avg_width, self.parking)
            # Nothing reads this layer again during the forward: hold no copy until the budgets are known.
            self.cache.layers[layer] = DynamicLayer()
        if chunk.final:
            self.bar.update(1)

    # ------------------------------------------------------------------------------------ the end

    def finalize(self) -> ZigZagCache:
        self.bar.close()
        plan = self.chunk.plan
        try:
            if not plan.known:
                lmba = plan.measured_lmba()  # waits for the forward pass
                # Every layer is scored: read the NaN flag now, while the accelerator is idle anyway,
                # rather than with a second wait after the settle.
                self._check_nan()
                # A named range, so that profiles (benchmarks/perf/profile.py) show what the budgets cost.
                with torch.profiler.record_function(FINALIZE_RANGE):
                    plan.settle(lmba)
                    self.settle(plan)
            else:
                self._check_nan()
        finally:
            self.close()  # after the settle's last fetch was enqueued: the fence follows it
        budgets, lmba = plan.report()
        return ZigZagCache(self.cache.layers, budgets=budgets, lmba=lmba)

    def _check_nan(self) -> None:
        if bool(self.nan_seen):
            raise ValueError(nan_message(self.scorer))

    def close(self) -> None:
        """Give the parked layers' host memory back to the arena once every copy from or to it is
        enqueued (the arena's fence keeps the next compression's copies behind them). Idempotent."""
        if self.parking is not None:
            self.parking.close()
            self.parking = None

    def settle(self, plan: BudgetPlan) -> None:
        """Cut each provisional layer to its final budget."""
        device = self.ctx.input_ids.device
        if self.parking is not None:
            self.parking.ready()
        # Python numbers from two host reductions: per-layer tensor checks cost the host more than the work.
        per_layer = plan.budgets.transpose(0, 1).reshape(self.num_layers, -1)
        widths, least = per_layer.amax(dim=1).tolist(), per_layer.amin(dim=1).tolist()
        # Shrink first, grow after: the cache never holds more than its final size plus one layer.
        avg_width = plan.avg_width
        order = sorted(range(self.num_layers), key=lambda i: widths[i] > avg_width)
        if self.merger is None:
            self._settle_sorted_once(plan, order, widths, least, device)
            return
        for i in order:
            pending = self.pending.pop(i)
            budget = plan.layer(i)
            ranked, keys, values = pending.full(device)
            kept = keep_best(ranked[..., : widths[i]], budget.device)[0]
            self.cache.layers[i] = build_layer(keys, values, kept, self.ctx.valid, self.merger, row_budgets=budget.row_budgets)

    def _settle_sorted_once(self, plan: BudgetPlan, order: list[int], widths: list[int], least: list[int], device: torch.device) -> None:
        """Every layer's kept positions in ascending order from one sort, then each layer's keys and values.
        ``widths`` / ``least``: each layer's largest and smallest budget over rows (and heads).

        Row ``(layer, b, h)`` of a ``(layers, batch, kv_heads, span)`` slab holds that head's best
        ``budget`` positions and ``-1`` elsewhere; sorted, each row ends with its kept positions,
        ascending, after the ``-1`` (the empty slots of :func:`~zigzag.pipeline.select.keep_best`, which
        come first). One sort instead of one per layer: each costs a dozen launches of the host's time,
        while the accelerator waits (this runs after the forward pass, with nothing left to overlap).
        """
        seq = self.ctx.seq
        first = self.pending[order[0]].top_positions
        span = max(widths)
        # int32 positions: half the memory and half the radix passes of int64 (positions < 2**31).
        slab = torch.full((self.num_layers, *first.shape[:2], span), -1, dtype=torch.int32, device=device)
        for i in order:  # positions only: keys and values come one layer at a time, below
            width = widths[i]
            candidates = self.pending[i].best_positions(width, device)
            if least[i] < width:  # rows (heads) with fewer: their extra ranks go
                budget = plan.layer(i).device.reshape(first.shape[0], -1, 1)
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
            self.cache.layers[i] = store_layer(keys, values, kept, original_length=seq, row_budgets=plan.layer(i).row_budgets)
