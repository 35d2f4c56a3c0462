"""Model-facing plumbing: validate inputs and models, capture queries, score, select and gather.

:func:`prefill_context` runs one ordinary forward pass over the context (with temporary hooks on the
query projections, removed in a ``finally`` block) and returns a :class:`Prefill` that holds the
full cache and everything scorers and allocators read; :meth:`Prefill.compress` turns it into a
:class:`~zigzag.cache.ZigZagCache` as often as a sweep needs. :func:`zigzag.compress_cache`
(:mod:`zigzag.streaming`) reuses the same pieces to compress layer by layer during the prefill.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from zigzag.kernels.precision import tf32_matmuls
from zigzag.pipeline.hf import decoder_of, forward_hooks, query_projection, rope_fn, rotate_half
from zigzag.kernels.moments import query_moments_half
from zigzag.budget import BudgetAllocator, get_budget, layer_mean_budgets
from zigzag.cache import CompressedLayer, ZigZagCache
from zigzag.kernels.gather import gather_split
from zigzag.merge import get_merge
from zigzag.pipeline.reconstruction import Reconstruction, reconstruction_scores
from zigzag.scorers import LayerView, Scorer, get_scorer, window_mass_sum
from zigzag.cache.varlen import VarlenLayer, heads_differ

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ATTENTION = ("sdpa", "eager")


class UnsupportedModelError(ValueError, NotImplementedError):
    """The model's architecture or attention implementation is not one zigzag can compress exactly."""


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Context:
    input_ids: torch.Tensor  # (batch, seq) long
    valid: torch.Tensor  # (batch, seq) bool, False on left padding
    positions: torch.Tensor  # (batch, seq) long RoPE positions, 0 on padding
    lengths: torch.Tensor  # (batch,) long unpadded lengths
    padded: bool  # some row has padding (read once here, so that no layer has to ask the device)


def _as_context(inputs, device: torch.device) -> _Context:
    if isinstance(inputs, torch.Tensor):
        input_ids, attention_mask = inputs, None
    elif isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError(f"inputs must contain 'input_ids'; got keys {sorted(inputs.keys())}")
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
    else:
        raise TypeError(
            "inputs must be a tokenizer output (a mapping with 'input_ids' and optionally 'attention_mask') "
            f"or a LongTensor of ids; got {type(inputs).__name__}"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an integer tensor; got {type(input_ids).__name__} {getattr(input_ids, 'dtype', '')}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor; got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor; got {type(attention_mask).__name__}")
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    valid = attention_mask.to(device=device) != 0
    if attention_mask.dtype not in (torch.bool, torch.int32, torch.int64) or not bool(
        ((attention_mask == 0) | (attention_mask == 1)).all()
    ):
        raise ValueError("attention_mask must hold only 0 and 1 (a 4D or float mask is not supported here)")
    lengths = valid.sum(dim=-1)
    if bool((lengths == 0).any()):
        raise ValueError(f"every row needs at least one real token; rows {lengths.eq(0).nonzero().flatten().tolist()} are all padding")
    # Left padding only: once a row starts, it never pads again.
    if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
        raise ValueError(
            "zigzag needs left padding (padding before the tokens): set tokenizer.padding_side = 'left'"
        )
    positions = (valid.long().cumsum(dim=-1) - 1).clamp(min=0)
    padded = bool((lengths < valid.shape[1]).any())
    return _Context(input_ids.to(device=device, dtype=torch.long), valid, positions, lengths, padded)


def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in [0, 1) (fraction of the cache removed); got {type(ratio).__name__}")
    if not (0.0 <= float(ratio) < 1.0) or math.isnan(ratio):
        raise ValueError(f"ratio must be in [0, 1) (fraction of the cache removed); got {ratio}")
    return float(ratio)


# ---------------------------------------------------------------------------------------------- model


def _check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(decoder_of(model), "layers"):
        raise TypeError(f"model must be a Hugging Face causal LM (e.g. LlamaForCausalLM); got {type(model).__name__}")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Adding one means checking its attention class applies "
            "standard RoPE to q_proj outputs (see zigzag/api.py)."
        )
    layer_types = getattr(config, "layer_types", None) or []
    sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
    uses_window = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if sliding or (uses_window and model_type == "mistral"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has sliding-window (or other non-full) attention layers "
            f"{sliding or 'all'}; zigzag compresses full-attention layers only"
        )
    attn = config._attn_implementation
    if attn not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"attention implementation {attn!r} is not supported; use one of {SUPPORTED_ATTENTION} "
            "(model.set_attn_implementation('sdpa'))"
        )


# ---------------------------------------------------------------------------------------------- capture


@dataclass
class _QueryCapture:
    """Per layer: pre-RoPE queries of the last ``window`` tokens and (optionally) query statistics."""

    window: int
    stats_skip: int | None  # None: no statistics
    heads: int
    head_dim: int
    valid: torch.Tensor
    padded: bool = True  # False: every token of every row is real (the context said so, without a sync)
    window_queries: dict[int, torch.Tensor] = field(default_factory=dict)  # (batch, heads, w, d) pre-RoPE
    mean: dict[int, torch.Tensor] = field(default_factory=dict)  # (batch, heads, d)
    cov: dict[int, torch.Tensor] = field(default_factory=dict)  # (batch, heads, d, d)

    def hook(self, layer_idx: int):
        def on_queries(module, args, output):
            batch, seq = output.shape[:2]
            q = output.reshape(batch, seq, self.heads, self.head_dim)
            if self.window:
                self.window_queries[layer_idx] = q[:, seq - self.window :].transpose(1, 2).float()
            if self.stats_skip is not None:
                self._statistics(layer_idx, q)

        return on_queries

    def _statistics(self, layer_idx: int, q: torch.Tensor) -> None:
        half_cuda = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
        if half_cuda and not self.padded:
            # The tokens that count are the columns after the sinks in every row: a view, and no
            # pass that multiplies the centred queries by a 0/1 mask.
            used = q[:, self.stats_skip :] if q.shape[1] > self.stats_skip else q
            self.mean[layer_idx], self.cov[layer_idx] = query_moments_half(used)
            return
        # Skip the first `stats_skip` real tokens of each row (attention sinks), and the padding.
        rank = self.valid.long().cumsum(dim=-1) - 1
        use = (self.valid & (rank >= self.stats_skip)).float()  # (batch, seq)
        use = torch.where(use.sum(-1, keepdim=True) > 0, use, self.valid.float())  # too short: use all
        count = use.sum(-1)[:, None, None]  # (batch, 1, 1)
        if half_cuda:
            self.mean[layer_idx], self.cov[layer_idx] = query_moments_half(q, use, count)
            return
        # One float32 copy of the queries, centred and masked in place (at 32k tokens and 32 heads each
        # extra copy is 512 MB of traffic per layer), and TF32 products, as for the scores they feed.
        with tf32_matmuls():
            centered = q.to(torch.float32, copy=True)  # a copy even for float32 models: q feeds attention
            mean = torch.einsum("bs,bshd->bhd", use, centered) / count
            centered.sub_(mean[:, None]).mul_(use[:, :, None, None])
            cov = torch.einsum("bshd,bshe->bhde", centered, centered) / count[..., None]
        self.mean[layer_idx], self.cov[layer_idx] = mean, cov


def _query_window_needed(scorer: Scorer, allocator: BudgetAllocator) -> int:
    """Last queries (after RoPE) that the scorer and, for LMBA, the allocator read."""
    return max(scorer.query_window, allocator.window if allocator.needs_lmba else 0)



@dataclass
class Prefill:
    """One uncompressed prefill and everything scorers and allocators read from it.

    Compress it as often as you like (:meth:`compress` never modifies it): a sweep over scorers,
    budgets and ratios then costs one forward pass per context instead of one per setting.

    Attributes:
        cache: the full ``DynamicCache``; layer ``l`` holds ``(batch, kv_heads, seq, head_dim)``.
        context: the validated input (ids, validity, positions, lengths).
        window_queries: per layer, the last ``window`` queries after RoPE, ``(batch, heads, window,
            head_dim)`` float32; empty when ``window == 0``.
        query_mean / query_cov: per layer, pre-RoPE query statistics ``(batch, heads, head_dim)`` and
            ``(batch, heads, head_dim, head_dim)``, skipping ``query_stats_skip`` first real tokens;
            empty when ``query_stats_skip`` is None.
        rope: the model's rotary embedding as a function of positions.
        scalings: per layer, the attention softmax scale.
        reconstruction: how the context was repeated for :class:`~zigzag.scorers.KVzip`, or None.
        reconstruction_scores: per layer, ``(batch, kv_heads, seq)`` float32 reconstruction scores
            (:mod:`zigzag.pipeline.reconstruction`); empty when ``reconstruction`` is None.
    """

    cache: DynamicCache
    context: _Context
    window_queries: dict[int, torch.Tensor]
    query_mean: dict[int, torch.Tensor]
    query_cov: dict[int, torch.Tensor]
    rope: object
    scalings: list[float]
    window: int
    query_stats_skip: int | None
    reconstruction: Reconstruction | None = None
    reconstruction_scores: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.scalings)

    def _queries(self, layer: int, count: int) -> torch.Tensor | None:
        if count == 0:
            return None
        q = self.window_queries[layer]
        return q[:, :, q.shape[2] - count :]

    def _check_needs(self, scorer: Scorer, allocator: BudgetAllocator) -> None:
        seq = self.context.input_ids.shape[1]
        wanted = _query_window_needed(scorer, allocator)
        if min(wanted, seq) > self.window:
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

    def scores(self, scorer: Scorer, layer: int) -> torch.Tensor:
        """``(batch, kv_heads, seq)`` float scores of one layer, ``-inf`` on padding."""
        full = self.cache.layers[layer]
        view = LayerView(
            keys=full.keys,
            values=full.values,
            valid=self.context.valid,
            positions=self.context.positions,
            scaling=self.scalings[layer],
            layer_idx=layer,
            num_layers=self.num_layers,
            window_queries=self._queries(layer, min(scorer.query_window, self.window)),
            query_mean=self.query_mean.get(layer),
            query_cov=self.query_cov.get(layer),
            rope=self.rope if scorer.needs_query_stats else None,
            padded=self.context.padded,
            reconstruction_scores=self.reconstruction_scores[layer] if self.reconstruction_scores else None,
        )
        return score_layer(scorer, view)

    def window_mass(self, layer: int, window: int) -> torch.Tensor:
        """``(batch, heads, seq)``: real softmax attention of the last ``window`` queries, averaged over them."""
        q = self._queries(layer, min(window, self.window))
        return window_mass(q, self.cache.layers[layer].keys, self.context.valid, self.scalings[layer], self.context.padded)

    def budgets(self, ratio: float, allocator: BudgetAllocator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(batch, num_layers)`` long budgets and the ``(batch, num_layers)`` LMBA (or None).

        Head-wise allocators (``head_wise = True``, e.g. ``zigzag_heads``) give both as
        ``(batch, num_layers, kv_heads)``: LMBA measured per KV head (``measure_heads``).
        """
        lengths = self.context.lengths
        avg_budget = ((1.0 - ratio) * lengths.double()).floor().long()
        lmba = None
        if allocator.needs_lmba:
            valid, window = self.context.valid, allocator.window
            if getattr(allocator, "head_wise", False):
                kv_heads = self.cache.layers[0].keys.shape[1]
                per_layer = [allocator.measure_heads(self.window_mass(i, window), valid, kv_heads) for i in range(self.num_layers)]
            else:
                per_layer = [allocator.measure(self.window_mass(i, window), valid) for i in range(self.num_layers)]
            lmba = torch.stack(per_layer, dim=1).cpu()
        return allocator.allocate(avg_budget.cpu(), lengths.cpu(), self.num_layers, lmba), lmba

    @torch.no_grad()
    def compress(
        self,
        ratio: float,
        scorer: str | Scorer = "snapkv",
        budget: str | BudgetAllocator = "zigzag",
        *,
        merge=None,
        progress: bool = False,
    ) -> ZigZagCache:
        """A compressed copy of this prefill; see :func:`compress_cache` for the arguments."""
        ratio = _check_ratio(ratio)
        scorer = get_scorer(scorer)
        allocator = get_budget(budget)
        merger = get_merge(merge)
        self._check_needs(scorer, allocator)
        budgets, lmba = self.budgets(ratio, allocator)
        device = self.context.input_ids.device
        layers = []
        for i in tqdm(range(self.num_layers), desc="compressing layers", disable=not progress):
            scores = self.scores(scorer, i)
            layer_budget = budgets[:, i].to(device)  # (batch,), or (batch, kv_heads) from a head-wise allocator
            if hasattr(allocator, "split_heads"):  # head-wise budgets inside the layer (AdaKV)
                layer_budget = allocator.split_heads(scores, self.context.valid, layer_budget)
            full = self.cache.layers[i]
            layers.append(build_layer(full.keys, full.values, select_tokens(scores, layer_budget), self.context.valid, merger))
        if budgets.dim() == 3:  # head-wise: report per layer (mean over KV heads, exact row totals)
            budgets, lmba = layer_mean_budgets(budgets), lmba.mean(dim=-1)
        return ZigZagCache(layers, budgets=budgets, lmba=lmba)


@torch.no_grad()
def prefill_context(
    model: nn.Module,
    inputs,
    *,
    window: int = 64,
    query_stats_skip: int | None = 4,
    reconstruction: Reconstruction | None = None,
    progress: bool = False,
) -> Prefill:
    """Run the model once over the context and keep what any scorer and allocator will need.

    Args:
        model: as for :func:`compress_cache`; left exactly as it was.
        inputs: as for :func:`compress_cache`.
        window: last queries kept after RoPE (SnapKV, TOVA and ZigZag's LMBA read them); 0 for none.
        query_stats_skip: sink tokens left out of the pre-RoPE query statistics (ExpectedAttention);
            None to skip the statistics.
        reconstruction: also repeat the context this way and keep the scores
            (:mod:`zigzag.pipeline.reconstruction`; what :class:`~zigzag.scorers.KVzip` reads); None to skip.
        progress: show a progress bar over the reconstruction's chunks.

    Returns:
        A :class:`Prefill`; ``prefill.compress(ratio, scorer, budget)`` gives a :class:`ZigZagCache`.
    """
    _check_model(model)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be a non-negative int; got {window!r}")
    if reconstruction is not None and not isinstance(reconstruction, Reconstruction):
        raise TypeError(f"reconstruction must be a zigzag.pipeline.reconstruction.Reconstruction or None; got {type(reconstruction).__name__}")
    device = next(model.parameters()).device
    ctx = _as_context(inputs, device)
    config = model.config
    decoder = decoder_of(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    seq = ctx.input_ids.shape[1]
    window = min(window, seq)
    capture = _QueryCapture(
        window=window, stats_skip=query_stats_skip, heads=heads, head_dim=head_dim, valid=ctx.valid, padded=ctx.padded
    )
    attentions = [layer.self_attn for layer in decoder.layers]
    cache = DynamicCache(config=config)
    with forward_hooks((query_projection(a), capture.hook(i)) for i, a in enumerate(attentions)):
        model(
            input_ids=ctx.input_ids,
            attention_mask=ctx.valid.long(),
            position_ids=ctx.positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    rope = rope_fn(model, cache.layers[0].keys)
    rotated: dict[int, torch.Tensor] = {}
    if window:
        cos, sin = rope(ctx.positions[:, seq - window :])  # (batch, window, head_dim)
        cos, sin = cos[:, None], sin[:, None]
        rotated = {i: q * cos + rotate_half(q) * sin for i, q in capture.window_queries.items()}
    repeated = []
    if reconstruction is not None:
        repeated = reconstruction_scores(model, cache, ctx.input_ids, ctx.valid, reconstruction, progress=progress)
    return Prefill(
        cache=cache,
        context=ctx,
        window_queries=rotated,
        query_mean=capture.mean,
        query_cov=capture.cov,
        rope=rope,
        scalings=[a.scaling for a in attentions],
        window=window,
        query_stats_skip=query_stats_skip,
        reconstruction=reconstruction,
        reconstruction_scores=repeated,
    )


# ---------------------------------------------------------------------------------------------- selection


def score_layer(scorer: Scorer, view: LayerView) -> torch.Tensor:
    """``(batch, kv_heads, seq)`` float32 scores of ``view``, ``-inf`` where ``view.valid`` is False."""
    with tf32_matmuls():
        scores = scorer.score(view)
    return scores.float().masked_fill(~view.valid[:, None, :], float("-inf"))


def window_mass(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float, padded: bool = True) -> torch.Tensor:
    """``(batch, heads, seq)``: softmax attention of the ``(batch, heads, w, head_dim)`` last queries over
    ``keys``, averaged over the queries (what ZigZag's LMBA is measured on). ``padded``: see
    :func:`~zigzag.scorers.window_attention`."""
    with tf32_matmuls():
        return window_mass_sum(queries, keys, valid, scaling, padded) / queries.shape[2]


def rank_tokens(scores: torch.Tensor) -> torch.Tensor:
    """``(batch, kv_heads, seq)`` columns from best to worst score; ties keep the earlier column first.

    The stable order is what makes selecting the top ``k`` at once (:func:`select_tokens`) and in
    two steps (:mod:`zigzag.streaming`, top ``k`` now and more later) keep exactly the same tokens.
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


def build_layer(
    keys: torch.Tensor,
    values: torch.Tensor,
    kept: torch.Tensor,
    valid: torch.Tensor,
    merger=None,
    *,
    row_budgets: torch.Tensor | None = None,
) -> CompressedLayer | VarlenLayer:
    """The compressed layer that keeps ``kept`` of one layer's full ``keys``/``values``.

    Args:
        keys, values: ``(batch, kv_heads, seq, head_dim)`` the layer's uncompressed cache.
        kept: ``(batch, kv_heads, n)`` long from :func:`select_tokens` (ascending, ``-1`` = empty slot).
        valid: ``(batch, seq)`` bool, False on left padding (padding is never merged).
        merger: None, or a merge object (:mod:`zigzag.merge`) folding evicted tokens into survivors.
        row_budgets: ``(batch,)`` host tensor of each row's budget when all its KV heads keep that many
            (layer-wise allocators); the layout is then known without a device sync. None: read it
            from ``kept``.

    Returns:
        A dense :class:`~zigzag.cache.CompressedLayer` ``(batch, kv_heads, n, head_dim)`` when, in every
        row, all KV heads keep the same number of tokens (uniform per-layer budgets: unchanged, as
        fast as before). Otherwise (head-wise budgets, AdaKV) a :class:`~zigzag.cache.varlen.VarlenLayer`
        that stores exactly the kept slots, so memory is the sum of the per-head budgets instead of
        the widest head times the head count.
    """
    merged_values, bias = None, None
    if merger is not None:
        merged = merger.merge(keys, values, kept, valid)
        merged_values = merged.values
        if getattr(merger, "preserve_mass", False):
            bias = merged.counts.clamp(min=1.0).log()  # empty slots (count 0) are masked anyway
    if row_budgets is None and heads_differ(kept):
        return VarlenLayer.from_full(keys, values, kept, merged_values=merged_values, prefix_bias=bias)
    out_keys, out_values = gather_kept(keys, values, kept)
    if merged_values is not None:
        out_values = merged_values
    return CompressedLayer(out_keys, out_values, kept, original_length=keys.shape[2], prefix_bias=bias, row_budgets=row_budgets)
