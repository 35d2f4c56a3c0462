"""One uncompressed prefill kept whole, compressed as often as a sweep needs.

:func:`run_prefill` runs one ordinary forward pass over the context (with temporary hooks on the
query projections, removed in a ``finally`` block) and returns a :class:`Prefill` holding the full
cache and everything scorers and allocators read; :meth:`Prefill.compress` turns it into a
:class:`~zigzag.cache.ZigZagCache` through the same :class:`~zigzag.pipeline.plan.BudgetPlan` and
the same selection as the layer-by-layer path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from zigzag.budget import BudgetAllocator
from zigzag.cache import ZigZagCache
from zigzag.pipeline.capture import (
    LayerQueries,
    QueryCapture,
    Slots,
    WindowRope,
    layer_view,
    query_window_needed,
)
from zigzag.pipeline.hf import (
    attention_modules,
    eval_mode,
    forward_hooks,
    output_projection,
    query_projection,
    query_shape,
    rope_fn,
    run_model,
)
from zigzag.pipeline.inputs import DEFAULT_BUDGET, DEFAULT_SCORER, Context, Keep, check_keep, resolve_methods
from zigzag.pipeline.plan import BudgetPlan
from zigzag.pipeline.reconstruction import reconstruction_scores
from zigzag.pipeline.select import build_layer, nan_message, score_layer, select_tokens, window_mass
from zigzag.scorers import Reconstruction, Scorer


@dataclass
class Prefill:
    """One uncompressed prefill and everything scorers and allocators read from it.

    Compress it as often as you like (:meth:`compress` never modifies it): a sweep over scorers,
    budgets and ratios then costs one forward pass per context instead of one per setting.

    Attributes:
        cache: the full ``DynamicCache``; layer ``l`` holds ``(batch, kv_heads, seq, head_dim)``.
        context: the validated input (ids, validity, positions, lengths).
        queries: per layer, the captured :class:`~zigzag.pipeline.capture.LayerQueries`: the last
            ``window`` queries after RoPE ``(batch, heads, window, head_dim)`` float32 (None when
            ``window == 0``) and the pre-RoPE statistics (None when ``query_stats_skip`` is None).
        rope: the model's rotary embedding as a function of positions.
        scalings: per layer, the attention softmax scale.
        window: queries kept per layer; query_stats_skip: sinks left out of the statistics.
        reconstruction: how the context was repeated for :class:`~zigzag.scorers.KVzip`, or None.
        reconstruction_scores: per layer, ``(batch, kv_heads, seq)`` float32 reconstruction scores
            (:mod:`zigzag.pipeline.reconstruction`); empty when ``reconstruction`` is None.
    """

    cache: DynamicCache
    context: Context
    queries: list[LayerQueries]
    rope: object
    scalings: list[float]
    window: int
    query_stats_skip: int | None
    reconstruction: Reconstruction | None = None
    reconstruction_scores: list[torch.Tensor] = field(default_factory=list)
    output_weights: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.scalings)

    @property
    def kv_heads(self) -> int:
        return self.cache.layers[0].keys.shape[1]

    def _check_needs(self, scorer: Scorer, allocator: BudgetAllocator) -> None:
        wanted = query_window_needed(scorer, allocator)
        if min(wanted, self.context.seq) > self.window:
            raise ValueError(
                f"{scorer.name} / {allocator.name} need the last {wanted} queries but this prefill kept "
                f"{self.window}; call prefill_context(..., window={wanted})"
            )
        if scorer.needs_query_stats and scorer.query_stats_skip != self.query_stats_skip:
            raise ValueError(
                f"{scorer.name} needs query statistics skipping {scorer.query_stats_skip} sink tokens but this "
                f"prefill has {self.query_stats_skip}; call prefill_context(..., query_stats_skip={scorer.query_stats_skip})"
            )
        wanted_repeat = getattr(scorer, "reconstruction", None)
        if wanted_repeat is not None and wanted_repeat != self.reconstruction:
            raise ValueError(
                f"{scorer.name} needs the context reconstructed with {wanted_repeat} but this prefill has "
                f"{self.reconstruction}; call prefill_context(..., reconstruction=scorer.reconstruction)"
            )

    def _slots(self, layer: int) -> Slots:
        full = self.cache.layers[layer]
        return Slots(full.keys, full.values, None, self.context.valid, padded=self.context.padded)

    def scores(
        self, scorer: Scorer, layer: int, nan_seen: torch.Tensor | None = None, mean_budget: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(batch, kv_heads, seq)`` float32 scores of one layer, ``-inf`` on padding (see
        :func:`~zigzag.pipeline.select.score_layer` for ``nan_seen``; ``mean_budget`` as in
        :class:`~zigzag.scorers.LayerView`)."""
        view = layer_view(
            scorer, self._slots(layer), self.queries[layer], self.context.positions, scaling=self.scalings[layer],
            layer_idx=layer, num_layers=self.num_layers, rope=self.rope,
            reconstruction_scores=self.reconstruction_scores[layer] if self.reconstruction_scores else None,
            output_weight=self.output_weights[layer] if self.output_weights else None, mean_budget=mean_budget,
        )  # fmt: skip
        return score_layer(scorer, view, nan_seen)

    def window_mass(self, layer: int, window: int) -> torch.Tensor:
        """``(batch, heads, seq)``: real softmax attention of the last ``window`` queries, averaged over them."""
        ctx = self.context
        return window_mass(self.queries[layer].last(window), self.cache.layers[layer].keys, ctx.valid, self.scalings[layer], ctx.padded)

    def plan(self, keep: Keep, allocator: BudgetAllocator) -> BudgetPlan:
        """The budget plan of ``allocator`` keeping ``keep`` of this prefill, with LMBA measured and budgets fixed."""
        ctx = self.context
        plan = BudgetPlan.start(
            allocator, keep.per_layer(ctx.lengths), ctx.lengths,
            num_layers=self.num_layers, kv_heads=self.kv_heads, device=ctx.input_ids.device,
        )  # fmt: skip
        if not plan.known:
            for i in range(self.num_layers):
                plan.record_lmba(self.window_mass(i, plan.window), ctx.valid)
            plan.settle()
        return plan

    def budgets(
        self, ratio: float | None, allocator: BudgetAllocator, *, max_tokens: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(batch, num_layers)`` long budgets and the ``(batch, num_layers)`` LMBA (or None), for
        exactly one of ``ratio`` / ``max_tokens`` (as for :func:`zigzag.compress_cache`).

        Head-wise allocators (granularity ``"head"``, e.g. ``zigzag_heads``) give both as
        ``(batch, num_layers, kv_heads)``: LMBA measured per KV head.
        """
        plan = self.plan(check_keep(ratio, max_tokens), allocator)
        return plan.budgets, plan.lmba

    @torch.no_grad()
    def compress(
        self,
        ratio: float | None = None,
        scorer=DEFAULT_SCORER,
        budget=DEFAULT_BUDGET,
        *,
        max_tokens: int | None = None,
        merge=None,
        progress: bool = False,
    ) -> ZigZagCache:
        """A compressed copy of this prefill; see :func:`zigzag.compress_cache` for the arguments."""
        keep = check_keep(ratio, max_tokens)
        scorer, allocator, merger = resolve_methods(scorer, budget, merge)
        self._check_needs(scorer, allocator)
        plan = self.plan(keep, allocator)
        valid = self.context.valid
        nan_seen = torch.zeros((), dtype=torch.bool, device=valid.device)
        mean_budget = plan.avg_budget.to(valid.device)
        layers = []
        for i in tqdm(range(self.num_layers), desc="compressing layers", disable=not progress):
            scores = self.scores(scorer, i, nan_seen, mean_budget)
            layer_budget = plan.layer(i, scores, valid)
            kept = select_tokens(scores, layer_budget.device, layer_budget.width)
            full = self.cache.layers[i]
            layers.append(build_layer(full.keys, full.values, kept, valid, merger, row_budgets=layer_budget.row_budgets))
        if bool(nan_seen):
            raise ValueError(nan_message(scorer))
        budgets, lmba = plan.report()
        return ZigZagCache(layers, budgets=budgets, lmba=lmba)


@torch.no_grad()
def run_prefill(
    model: nn.Module,
    ctx: Context,
    *,
    window: int,
    query_stats_skip: int | None,
    reconstruction: Reconstruction | None,
    progress: bool,
) -> Prefill:
    """One forward pass over ``ctx`` that keeps the full cache and the captured queries (arguments as
    for :func:`zigzag.prefill_context`, already validated)."""
    heads, _, head_dim = query_shape(model.config)
    window = min(window, ctx.seq)
    capture = QueryCapture(window=window, stats_skip=query_stats_skip, heads=heads, head_dim=head_dim, valid=ctx.valid, padded=ctx.padded)
    attentions = attention_modules(model)
    cache = DynamicCache(config=model.config)
    with eval_mode(model):
        with forward_hooks((query_projection(a), capture.hook(i)) for i, a in enumerate(attentions)):
            run_model(
                model, cache, input_ids=ctx.input_ids, attention_mask=ctx.valid.long(), position_ids=ctx.positions,
                use_cache=True, logits_to_keep=1,
            )  # fmt: skip
        repeated = []
        if reconstruction is not None:
            repeated = reconstruction_scores(model, cache, ctx.input_ids, ctx.valid, reconstruction, progress=progress)
    rope = rope_fn(model, cache.layers[0].keys)
    window_rope = WindowRope.at(rope, ctx.positions[:, ctx.seq - window :]) if window else None
    queries = [capture.take(i, window_rope) for i in range(len(attentions))]
    return Prefill(
        cache=cache,
        context=ctx,
        queries=queries,
        rope=rope,
        scalings=[a.scaling for a in attentions],
        output_weights=[output_projection(a).weight for a in attentions],
        window=window,
        query_stats_skip=query_stats_skip,
        reconstruction=reconstruction,
        reconstruction_scores=repeated,
    )
