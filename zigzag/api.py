"""`compress_cache`: prefill a context, score every cached token, allocate budgets, keep the best.

This is the only module that knows about models. It validates its input, runs one ordinary forward
pass of the model over the context (with temporary hooks on the query projections, removed in a
``finally`` block, to collect what the scorer and the budget allocator need), and builds a
:class:`~zigzag.cache.ZigZagCache` from the kept tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from zigzag.budget import BudgetAllocator, get_budget
from zigzag.cache import CompressedLayer, ZigZagCache
from zigzag.scorers import LayerView, Scorer, get_scorer, window_attention

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
    return _Context(input_ids.to(device=device, dtype=torch.long), valid, positions, lengths)


def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in [0, 1) (fraction of the cache removed); got {type(ratio).__name__}")
    if not (0.0 <= float(ratio) < 1.0) or math.isnan(ratio):
        raise ValueError(f"ratio must be in [0, 1) (fraction of the cache removed); got {ratio}")
    return float(ratio)


# ---------------------------------------------------------------------------------------------- model


def _decoder(model: nn.Module) -> nn.Module:
    return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model


def _check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(_decoder(model), "layers"):
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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_fn(model: nn.Module, like: torch.Tensor):
    rotary = _decoder(model).rotary_emb

    def rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary(like, positions.to(like.device))
        return cos.float(), sin.float()

    return rope


# ---------------------------------------------------------------------------------------------- capture


@dataclass
class _QueryCapture:
    """Per layer: pre-RoPE queries of the last ``window`` tokens and (optionally) query statistics."""

    window: int
    stats_skip: int | None  # None: no statistics
    heads: int
    head_dim: int
    valid: torch.Tensor
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
        # Skip the first `stats_skip` real tokens of each row (attention sinks), and the padding.
        rank = self.valid.long().cumsum(dim=-1) - 1
        use = (self.valid & (rank >= self.stats_skip)).float()  # (batch, seq)
        use = torch.where(use.sum(-1, keepdim=True) > 0, use, self.valid.float())  # too short: use all
        count = use.sum(-1)[:, None, None]  # (batch, 1, 1)
        qf = q.float()
        mean = torch.einsum("bs,bshd->bhd", use, qf) / count
        centered = (qf - mean[:, None]) * use[:, :, None, None]
        cov = torch.einsum("bshd,bshe->bhde", centered, centered) / count[..., None]
        self.mean[layer_idx], self.cov[layer_idx] = mean, cov


def _query_projection(attention: nn.Module) -> nn.Module:
    # Qwen3 normalises queries per head after the projection and before RoPE.
    return attention.q_norm if hasattr(attention, "q_norm") else attention.q_proj


@contextlib.contextmanager
def _hooks(modules_and_hooks) -> Iterator[None]:
    handles = []
    try:
        for module, hook in modules_and_hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def prefill(model: nn.Module, ctx: _Context, window: int, stats_skip: int | None):
    """Run the model over the context once, collecting what scorers and allocators need.

    Args:
        ctx: the validated context (``_as_context``).
        window: number of last queries to keep, after RoPE (0 for none).
        stats_skip: leading real tokens left out of the pre-RoPE query statistics; None for no statistics.

    Returns:
        ``(cache, window_queries, capture, rope)``: the full ``DynamicCache``; per layer the last
        ``window`` queries after RoPE ``(batch, heads, window, head_dim)`` float32 (None if
        ``window == 0``); the :class:`_QueryCapture` with the statistics; the model's RoPE function.
    """
    config = model.config
    decoder = _decoder(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    seq = ctx.input_ids.shape[1]
    capture = _QueryCapture(window=window, stats_skip=stats_skip, heads=heads, head_dim=head_dim, valid=ctx.valid)
    attentions = [layer.self_attn for layer in decoder.layers]
    cache = DynamicCache(config=config)
    with _hooks((_query_projection(a), capture.hook(i)) for i, a in enumerate(attentions)):
        model(
            input_ids=ctx.input_ids,
            attention_mask=ctx.valid.long(),
            position_ids=ctx.positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    rope = _rope_fn(model, cache.layers[0].keys)
    rotated = None
    if window:
        cos, sin = rope(ctx.positions[:, seq - window :])  # (batch, window, head_dim)
        cos, sin = cos[:, None], sin[:, None]
        rotated = {i: q * cos + _rotate_half(q) * sin for i, q in capture.window_queries.items()}
    return cache, rotated, capture, rope


# ---------------------------------------------------------------------------------------------- selection


def select_tokens(scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Pick each row's ``budgets[b]`` best tokens per KV head.

    Args:
        scores: ``(batch, kv_heads, seq)`` float; ``-inf`` on tokens that must never be kept.
        budgets: ``(batch,)`` or ``(batch, kv_heads)`` long, tokens to keep.

    Returns:
        ``(batch, kv_heads, max budget)`` long: kept columns in ascending order, ``-1`` on the empty
        slots of rows (heads) whose budget is below the widest; empty slots come first.
    """
    width = int(budgets.max()) if budgets.numel() else 0
    if width == 0:
        return scores.new_empty(*scores.shape[:2], 0, dtype=torch.long)
    best = scores.topk(width, dim=-1, sorted=True).indices  # (batch, kv_heads, width)
    limit = budgets if budgets.dim() == 2 else budgets[:, None]
    used = torch.arange(width, device=scores.device)[None, None, :] < limit[..., None].to(scores.device)
    return torch.where(used, best, -1).sort(dim=-1).values


def gather_slots(states: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``states (batch, kv_heads, seq, head_dim)`` at ``kept (batch, kv_heads, n)``; zeros on -1."""
    index = kept.clamp(min=0)[..., None].expand(-1, -1, -1, states.shape[-1])
    return torch.gather(states, 2, index) * (kept >= 0)[..., None].to(states.dtype)


# ---------------------------------------------------------------------------------------------- entry point


@torch.no_grad()
def compress_cache(
    model: nn.Module,
    inputs,
    ratio: float,
    scorer: str | Scorer = "snapkv",
    budget: str | BudgetAllocator = "zigzag",
    *,
    progress: bool = False,
) -> ZigZagCache:
    """Prefill ``inputs`` and return a compressed cache that keeps ``1 - ratio`` of it.

    Args:
        model: a Hugging Face causal LM (Llama, Mistral without sliding window, Qwen2, Qwen3) using
            ``"sdpa"`` or ``"eager"`` attention. It is left exactly as it was.
        inputs: tokenizer output (``input_ids`` and optional ``attention_mask``, ``(batch, seq)``,
            left padded) or a ``(batch, seq)`` / ``(seq,)`` LongTensor of ids.
        ratio: fraction of the cache removed, in ``[0, 1)``. Row ``b`` (``T_b`` real tokens) keeps
            ``num_layers * int((1 - ratio) * T_b)`` tokens per KV head, shared across layers by ``budget``.
        scorer: a name from ``zigzag.scorers.SCORERS`` or a scorer object (higher score = keep).
        budget: a name from ``zigzag.budget.BUDGETS`` or an allocator object.
        progress: show a progress bar over layers.

    Returns:
        A :class:`~zigzag.cache.ZigZagCache`. Continue with ``model.generate(input_ids=cat(context,
        question), attention_mask=..., past_key_values=cache)``: positions continue from ``seq``.
    """
    ratio = _check_ratio(ratio)
    scorer = get_scorer(scorer)
    allocator = get_budget(budget)
    _check_model(model)
    device = next(model.parameters()).device
    ctx = _as_context(inputs, device)
    decoder = _decoder(model)
    num_layers = len(decoder.layers)
    seq = ctx.input_ids.shape[1]

    lmba_window = allocator.window if allocator.needs_lmba else 0
    window = min(seq, max(scorer.query_window, lmba_window))
    stats_skip = scorer.query_stats_skip if scorer.needs_query_stats else None
    full, rotated, capture, rope = prefill(model, ctx, window, stats_skip)
    attentions = [layer.self_attn for layer in decoder.layers]

    scores, lmba = [], []
    for i in tqdm(range(num_layers), desc="scoring layers", disable=not progress):
        layer = full.layers[i]
        view = LayerView(
            keys=layer.keys,
            values=layer.values,
            valid=ctx.valid,
            positions=ctx.positions,
            scaling=attentions[i].scaling,
            layer_idx=i,
            num_layers=num_layers,
            window_queries=rotated[i][:, :, window - min(window, scorer.query_window) :] if scorer.query_window else None,
            query_mean=capture.mean.get(i),
            query_cov=capture.cov.get(i),
            rope=rope if scorer.needs_query_stats else None,
        )
        layer_scores = scorer.score(view).float()
        scores.append(layer_scores.masked_fill(~ctx.valid[:, None, :], float("-inf")))
        if allocator.needs_lmba:
            q = rotated[i][:, :, window - min(window, lmba_window) :]
            mass = window_attention(q, layer.keys, ctx.valid, attentions[i].scaling).mean(dim=2)  # (batch, heads, seq)
            lmba.append(allocator.measure(mass, ctx.valid))

    avg_budget = ((1.0 - ratio) * ctx.lengths.double()).floor().long()
    lmba_table = torch.stack(lmba, dim=1) if lmba else None  # (batch, num_layers)
    budgets = allocator.allocate(avg_budget.cpu(), ctx.lengths.cpu(), num_layers, None if lmba_table is None else lmba_table.cpu())

    layers = []
    for i in range(num_layers):
        kept = select_tokens(scores[i], budgets[:, i].to(device))
        layers.append(
            CompressedLayer(
                gather_slots(full.layers[i].keys, kept),
                gather_slots(full.layers[i].values, kept),
                kept,
                original_length=seq,
            )
        )
        full.layers[i].keys = full.layers[i].values = None  # free as we go
    return ZigZagCache(layers, budgets=budgets, lmba=lmba_table)
