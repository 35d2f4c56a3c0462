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

from zigzag.api import (
    _QueryCapture,
    _as_context,
    _check_model,
    _check_ratio,
    _Context,
    _decoder,
    _hooks,
    _query_projection,
    _query_window_needed,
    _rope_fn,
    _rotate_half,
    build_layer,
    gather_slots,
    rank_tokens,
    score_layer,
    select_tokens,
)
from zigzag.budget import BudgetAllocator, get_budget
from zigzag.cache import CompressedLayer, ZigZagCache
from zigzag.merge import get_merge
from zigzag.scorers import LayerView, Scorer, get_scorer, window_attention


@dataclass
class _Provisional:
    """One layer waiting for its final budget (LMBA allocators).

    ``top_*``: the ``width`` best tokens of each (row, head) on the accelerator, best first;
    ``rest_*``: all the others, best first, in host memory. Positions are ``input_ids`` columns.
    """

    top_positions: torch.Tensor  # (batch, kv_heads, width) long
    top_keys: torch.Tensor  # (batch, kv_heads, width, head_dim)
    top_values: torch.Tensor
    rest_positions: torch.Tensor  # (batch, kv_heads, seq - width) long, host
    rest_keys: torch.Tensor  # (batch, kv_heads, seq - width, head_dim), host
    rest_values: torch.Tensor

    def best(self, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``count`` best positions, keys and values of each (row, head), best first."""
        width = self.top_positions.shape[-1]
        if count <= width:
            return self.top_positions[..., :count], self.top_keys[..., :count, :], self.top_values[..., :count, :]
        more = count - width

        def fetch(t: torch.Tensor) -> torch.Tensor:
            return t[..., :more, :].to(device, non_blocking=True)

        positions = self.rest_positions[..., :more].to(device, non_blocking=True)
        return (
            torch.cat([self.top_positions, positions], dim=-1),
            torch.cat([self.top_keys, fetch(self.rest_keys)], dim=-2),
            torch.cat([self.top_values, fetch(self.rest_values)], dim=-2),
        )

    def full(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All positions best first, and the uncompressed ``(batch, kv_heads, seq, head_dim)`` keys and
        values in column order again (merging needs every evicted token)."""
        seq = self.top_positions.shape[-1] + self.rest_positions.shape[-1]
        ranked, keys, values = self.best(seq, device)
        order = ranked.argsort(dim=-1)[..., None].expand_as(keys)
        return ranked, keys.gather(2, order), values.gather(2, order)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _take_ranked(ranked: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    index = ranked[..., None].expand(-1, -1, -1, keys.shape[-1])
    return keys.gather(2, index), values.gather(2, index)


def _finish(positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, budget: torch.Tensor, seq: int) -> CompressedLayer:
    """Slots of the best-first ``positions`` within ``budget`` ((batch,) or (batch, kv_heads)), ascending."""
    limit = budget if budget.dim() == 2 else budget[:, None]
    used = torch.arange(positions.shape[-1], device=positions.device) < limit[..., None].to(positions.device)
    kept, order = torch.where(used, positions, -1).sort(dim=-1)
    index = order[..., None].expand_as(keys)
    slot = (kept >= 0)[..., None].to(keys.dtype)
    return CompressedLayer(keys.gather(2, index) * slot, values.gather(2, index) * slot, kept, original_length=seq)


class _LayerwiseCompressor:
    """The hooks' state during one prefill: what has been captured and what each layer became."""

    def __init__(self, model: nn.Module, ctx: _Context, ratio: float, scorer: Scorer, allocator: BudgetAllocator, merger, progress: bool):
        config = model.config
        self.model, self.ctx = model, ctx
        self.scorer, self.allocator, self.merger = scorer, allocator, merger
        self.attentions = [layer.self_attn for layer in _decoder(model).layers]
        self.num_layers = len(self.attentions)
        self.heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        seq = ctx.input_ids.shape[1]
        self.window = min(_query_window_needed(scorer, allocator), seq)
        self.stats_skip = scorer.query_stats_skip if scorer.needs_query_stats else None
        self.avg_budget = ((1.0 - ratio) * ctx.lengths.double()).floor().long()
        self.budgets = None if allocator.needs_lmba else allocator.allocate(self.avg_budget.cpu(), ctx.lengths.cpu(), self.num_layers, None)
        self.lmba: list[torch.Tensor] = []
        self.pending: dict[int, _Provisional] = {}
        self.cache = DynamicCache(config=config)
        self.capture = _QueryCapture(
            window=self.window, stats_skip=self.stats_skip, heads=self.heads, head_dim=self.head_dim, valid=ctx.valid
        )
        self.rope = None
        self.bar = tqdm(total=self.num_layers, desc="prefill + compress", disable=not progress)

    def _window_queries(self, layer: int, keys: torch.Tensor) -> torch.Tensor | None:
        if not self.window:
            return None
        if self.rope is None:
            self.rope = _rope_fn(self.model, keys)
            seq = self.ctx.input_ids.shape[1]
            cos, sin = self.rope(self.ctx.positions[:, seq - self.window :])
            self.cos, self.sin = cos[:, None], sin[:, None]
        q = self.capture.window_queries.pop(layer)
        return q * self.cos + _rotate_half(q) * self.sin

    def hook(self, layer: int):
        def after_attention(module, args, output):
            self.compress_layer(layer)

        return after_attention

    def compress_layer(self, layer: int) -> None:
        full = self.cache.layers[layer]
        keys, values, ctx = full.keys, full.values, self.ctx
        queries = self._window_queries(layer, keys)
        if self.rope is None and self.scorer.needs_query_stats:
            self.rope = _rope_fn(self.model, keys)

        def last(count: int) -> torch.Tensor | None:
            count = min(count, self.window)
            return None if count == 0 else queries[:, :, queries.shape[2] - count :]

        view = LayerView(
            keys=keys,
            values=values,
            valid=ctx.valid,
            positions=ctx.positions,
            scaling=self.attentions[layer].scaling,
            layer_idx=layer,
            num_layers=self.num_layers,
            window_queries=last(self.scorer.query_window),
            query_mean=self.capture.mean.pop(layer, None),
            query_cov=self.capture.cov.pop(layer, None),
            rope=self.rope if self.scorer.needs_query_stats else None,
        )
        scores = score_layer(self.scorer, view)
        if self.budgets is not None:
            layer_budget = self.budgets[:, layer].to(keys.device)
            if hasattr(self.allocator, "split_heads"):
                layer_budget = self.allocator.split_heads(scores, ctx.valid, layer_budget)
            self.cache.layers[layer] = build_layer(keys, values, select_tokens(scores, layer_budget), ctx.valid, self.merger)
        else:
            mass = window_attention(last(self.allocator.window), keys, ctx.valid, view.scaling).mean(dim=2)
            self.lmba.append(self.allocator.measure(mass, ctx.valid))
            ranked = rank_tokens(scores)
            width = int(self.avg_budget.max())
            top_keys, top_values = _take_ranked(ranked[..., :width], keys, values)
            rest_keys, rest_values = _take_ranked(ranked[..., width:], keys, values)
            self.pending[layer] = _Provisional(
                top_positions=ranked[..., :width],
                top_keys=top_keys,
                top_values=top_values,
                rest_positions=_to_host(ranked[..., width:]),
                rest_keys=_to_host(rest_keys),
                rest_values=_to_host(rest_values),
            )
            # Until the budgets are known the layer holds its provisional best tokens only.
            self.cache.layers[layer] = _finish(ranked[..., :width], top_keys, top_values, self.avg_budget.to(keys.device), keys.shape[2])
        self.bar.update(1)

    def finalize(self) -> ZigZagCache:
        self.bar.close()
        ctx, seq = self.ctx, self.ctx.input_ids.shape[1]
        lmba = None
        if self.budgets is None:
            lmba = torch.stack(self.lmba, dim=1).cpu()
            self.budgets = self.allocator.allocate(self.avg_budget.cpu(), ctx.lengths.cpu(), self.num_layers, lmba)
            device = ctx.input_ids.device
            width = int(self.avg_budget.max())
            # Shrink first, grow after: the cache never holds more than its final size plus one layer.
            order = sorted(range(self.num_layers), key=lambda i: int(self.budgets[:, i].max()) > width)
            for i in order:
                pending = self.pending.pop(i)
                budget = self.budgets[:, i].to(device)
                if self.merger is not None:
                    ranked, keys, values = pending.full(device)
                    used = torch.arange(seq, device=device) < budget[:, None, None]
                    kept = torch.where(used, ranked, -1).sort(dim=-1).values[..., seq - int(budget.max()) :]
                    self.cache.layers[i] = build_layer(keys, values, kept, ctx.valid, self.merger)
                else:
                    self.cache.layers[i] = _finish(*pending.best(int(budget.max()), device), budget, seq)
        return ZigZagCache(self.cache.layers, budgets=self.budgets, lmba=lmba)


@torch.no_grad()
def compress_cache(
    model: nn.Module,
    inputs,
    ratio: float,
    scorer: str | Scorer = "snapkv",
    budget: str | BudgetAllocator = "zigzag",
    *,
    merge=None,
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
        progress: show a progress bar over layers.

    Returns:
        A :class:`~zigzag.cache.ZigZagCache`. Continue with ``model.generate(input_ids=cat(context,
        question), attention_mask=..., past_key_values=cache)``: positions continue from ``seq``.
    """
    ratio = _check_ratio(ratio)
    scorer = get_scorer(scorer)
    allocator = get_budget(budget)
    merger = get_merge(merge)
    _check_model(model)
    ctx = _as_context(inputs, next(model.parameters()).device)
    work = _LayerwiseCompressor(model, ctx, ratio, scorer, allocator, merger, progress)
    queries = ((_query_projection(a), work.capture.hook(i)) for i, a in enumerate(work.attentions))
    after = ((a, work.hook(i)) for i, a in enumerate(work.attentions))
    with _hooks(list(queries) + list(after)):
        model(
            input_ids=ctx.input_ids,
            attention_mask=ctx.valid.long(),
            position_ids=ctx.positions,
            past_key_values=work.cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return work.finalize()
