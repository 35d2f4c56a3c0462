"""DuoAttention head patterns, measured offline without training: how much each KV head's attention
output changes when the head only sees the attention sinks and a recent window.

DuoAttention (https://arxiv.org/abs/2410.10819, "DuoAttention: Efficient Long-Context LLM Inference
with Retrieval and Streaming Heads") learns one gate per (layer, KV head) by distillation: a gate
mixes the head's full attention with its *streaming* attention (the first ``n_sink`` tokens and the
last ``recent`` ones), and the loss is the change of the model's output. This module measures, in one
forward pass per calibration chunk, the quantity the gate trades off, head by head:

``d(l, h) = sum_{q in group(h)} sum_{i >= n_sink + recent} ||O_full[q, i] - O_stream[q, i]||^2
/ sum_{q in group(h)} sum_{i >= n_sink + recent} ||O_full[q, i]||^2``

with ``O_full[q, i] = softmax(q_i K_{<=i}^T * scale) V`` the head's causal attention output at query
``i`` and ``O_stream`` the same attention restricted to keys ``j < n_sink`` or ``i - recent < j <= i``
(the sinks and the ``recent`` last tokens up to the query, which a streaming cache of that size holds).
Queries ``i < n_sink + recent`` see nothing else, so they are left out. The ratio is taken over the
whole GQA group of query heads, which share the KV head's cache; ``d`` is averaged over the chunks.
A small ``d`` marks a streaming head (:class:`zigzag.budget.DuoAttention`).

The queries, keys and values are the model's own, after RoPE: a hook on each layer's query
projection keeps its pre-RoPE queries (rotated here with the model's rotary embedding), and a hook
on the attention module reads the layer's keys and values from the cache once it has been updated.
Each layer is measured as soon as its attention has run and its queries are let go, so memory is one
chunk's cache plus one GQA group's ``block x chunk`` score matrices at a time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedTokenizerBase

from zigzag.budget.duo import read_duo_profile
from zigzag.calibrate.sensitivity import save_profile
from zigzag.calibrate.texts import stdlib_docstrings, window_starts
from zigzag.pipeline.hf import (
    attention_modules,
    check_model,
    eval_mode,
    forward_hooks,
    query_projection,
    query_shape,
    rope_fn,
    rotate_half,
    run_model,
)

__all__ = [
    "DuoConfig",
    "LayerAttention",
    "calibrate_duo",
    "calibration_chunks",
    "capture_attention",
    "measure_head_patterns",
    "pattern_summary",
    "read_duo_profile",
    "streaming_deviation",
]


@dataclass(frozen=True)
class DuoConfig:
    """How :func:`measure_head_patterns` measures.

    Attributes:
        n_sink: attention sinks a streaming head keeps (128: ``sink_size`` of DuoAttention's released
            patterns, https://github.com/mit-han-lab/duo-attention, ``attn_patterns/*/config.json``).
        recent: recent tokens a streaming head keeps (256: ``recent_size``, same source).
        chunk_tokens: tokens of each calibration chunk (one forward pass each); must exceed
            ``n_sink + recent``, whose queries are not scored.
        chunks: calibration chunks cut from the text.
        seed: picks the chunks' offsets in the text.
        block: queries scored at once (memory: a ``block x chunk_tokens`` float32 score matrix per
            query head of one GQA group).
    """

    n_sink: int = 128
    recent: int = 256
    chunk_tokens: int = 2048
    chunks: int = 8
    seed: int = 0
    block: int = 1024

    def __post_init__(self) -> None:
        for arg, least in (("n_sink", 0), ("recent", 1), ("chunks", 1), ("block", 1)):
            value = getattr(self, arg)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{arg} must be an int >= {least}; got {value!r}")
        if (
            isinstance(self.chunk_tokens, bool)
            or not isinstance(self.chunk_tokens, int)
            or self.chunk_tokens <= self.n_sink + self.recent
        ):
            raise ValueError(
                f"chunk_tokens must be an int > n_sink + recent = {self.n_sink + self.recent} (those first "
                f"queries see the whole chunk and are not scored); got {self.chunk_tokens!r}"
            )


@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention inputs for one forward pass.

    Attributes:
        queries: ``(batch, heads, seq, head_dim)`` float32, after RoPE.
        keys, values: ``(batch, kv_heads, seq, head_dim)`` as the model caches them (keys after RoPE).
        scaling: the softmax scale of the layer's attention.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float


@torch.no_grad()
def capture_attention(
    model: nn.Module, input_ids: torch.Tensor, on_layer: Callable[[int, LayerAttention], None]
) -> None:
    """Run ``model`` once over ``input_ids`` and call ``on_layer(layer_idx, attention)`` as each layer's
    attention runs, in layer order.

    Args:
        model: a supported decoder (see :func:`zigzag.compress_cache`), left as it was.
        input_ids: ``(batch, seq)`` long, unpadded rows (positions ``0 .. seq - 1``).
        on_layer: receives the layer's :class:`LayerAttention`; the tensors are let go after it returns.
    """
    check_model(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids must be a (batch, seq) tensor with seq >= 1; got {getattr(input_ids, 'shape', input_ids)!r}"
        )
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    batch, seq = input_ids.shape
    heads, _, head_dim = query_shape(model.config)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    attentions = attention_modules(model)
    cache = DynamicCache(config=model.config)
    pending: dict[int, torch.Tensor] = {}
    rotation: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_queries(layer_idx: int):
        def hook(module, args, output) -> None:
            # (batch, seq, heads * head_dim), or (batch, seq, heads, head_dim) after a per-head norm
            pending[layer_idx] = output.reshape(batch, seq, heads, head_dim).transpose(1, 2).float()

        return hook

    def on_attention(layer_idx: int):
        def hook(module, args, output) -> None:
            layer = cache.layers[layer_idx]
            if not rotation:  # the same positions in every layer: one RoPE table for the pass
                cos, sin = rope_fn(model, layer.keys)(positions)
                rotation.append((cos[:, None], sin[:, None]))
            cos, sin = rotation[0]
            q = pending.pop(layer_idx)
            q = q * cos + rotate_half(q) * sin
            on_layer(layer_idx, LayerAttention(q, layer.keys, layer.values, float(module.scaling)))

        return hook

    hooks = [(query_projection(a), on_queries(i)) for i, a in enumerate(attentions)]
    hooks += [(a, on_attention(i)) for i, a in enumerate(attentions)]
    with eval_mode(model), forward_hooks(hooks):
        run_model(
            model, cache, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=positions,
            use_cache=True, logits_to_keep=1,
        )  # fmt: skip


def streaming_deviation(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    n_sink: int,
    recent: int,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sums of ``d`` (module docstring) for one row of one layer.

    Args:
        queries: ``(heads, seq, head_dim)`` after RoPE.
        keys, values: ``(kv_heads, seq, head_dim)``; query head ``q`` reads KV head ``q // (heads // kv_heads)``.
        scaling: softmax scale.
        n_sink, recent: the streaming window.
        block: queries scored at once (memory: ``heads // kv_heads`` score matrices of
            ``block x seq`` floats, two of them alive at a time).

    Returns:
        ``(deviation, norm)``, each ``(kv_heads,)`` float64: ``sum ||O_full - O_stream||^2`` and
        ``sum ||O_full||^2`` over the group's query heads and the queries ``i >= n_sink + recent``.
    """
    heads, seq, _ = queries.shape
    kv_heads = keys.shape[0]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    group = heads // kv_heads
    deviation = torch.zeros(kv_heads, dtype=torch.float64)
    norm = torch.zeros(kv_heads, dtype=torch.float64)
    first = n_sink + recent
    cols = torch.arange(seq, device=queries.device)
    for start in range(first, seq, block):
        stop = min(start + block, seq)  # causal: no query of the block reads past `stop`
        rows, seen = cols[start:stop, None], cols[None, :stop]
        future = seen > rows
        # Neither a sink nor one of the `recent` tokens ending at the query.
        middle = (seen >= n_sink) & (seen <= rows - recent)
        for kv in range(kv_heads):
            q = queries[kv * group : (kv + 1) * group, start:stop].float()  # the group's query heads
            k, v = keys[kv, :stop].float(), values[kv, :stop].float()
            scores = torch.matmul(q, k.T.contiguous()).mul_(scaling).masked_fill_(future, float("-inf"))
            full = torch.matmul(scores.softmax(dim=-1), v)
            # A softmax of its own, not a re-normalization of the full one: the row's largest score may
            # lie in the middle, and the streaming part of its exponentials could underflow to 0.
            stream = torch.matmul(scores.masked_fill_(middle, float("-inf")).softmax(dim=-1), v)
            deviation[kv] += (full - stream).square().sum().double().cpu()
            norm[kv] += full.square().sum().double().cpu()
    return deviation, norm


def calibration_chunks(token_ids: Sequence[int], config: DuoConfig) -> list[list[int]]:
    """``config.chunks`` windows of ``config.chunk_tokens`` tokens cut from one long token stream, at
    offsets drawn with ``config.seed`` (without overlap when the stream is long enough)."""
    span, n = config.chunk_tokens, config.chunks
    if len(token_ids) < span:
        raise ValueError(f"the calibration text has {len(token_ids)} tokens; a chunk needs {span}")
    starts = window_starts(len(token_ids), span, n, config.seed)
    return [list(token_ids[start : start + span]) for start in starts]


@torch.no_grad()
def measure_head_patterns(
    model: nn.Module,
    input_ids: Sequence[int] | torch.Tensor,
    config: DuoConfig = DuoConfig(),
    *,
    progress: bool = False,
) -> dict:
    """Measure each (layer, KV head)'s streaming deviation ``d`` (module docstring).

    Args:
        model: a supported decoder (see :func:`zigzag.compress_cache`), on its device; left as it was.
        input_ids: the tokenized calibration text (a flat sequence of ids), at least
            ``config.chunk_tokens`` long.
        config: what to measure.
        progress: a progress bar over chunks.

    Returns:
        The profile: ``{"method": "duo", "layers": (L, kv_heads) nested list of d, "per_chunk":
        (chunks, L, kv_heads) nested list, "config": ...}``; ``"layers"`` is the mean of ``"per_chunk"``.
        Write it with :func:`zigzag.calibrate.save_profile`; :class:`zigzag.budget.DuoAttention` reads it.
    """
    ids = input_ids.reshape(-1).tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    chunks = calibration_chunks(ids, config)
    num_layers = len(attention_modules(model))
    _, kv_heads, _ = query_shape(model.config)
    per_chunk: list[list[list[float]]] = []
    for chunk in tqdm(chunks, desc="duo head patterns", disable=not progress):
        ratios = torch.zeros(num_layers, kv_heads, dtype=torch.float64)

        def on_layer(layer_idx: int, att: LayerAttention, ratios=ratios) -> None:
            deviation, norm = streaming_deviation(
                att.queries[0], att.keys[0], att.values[0], att.scaling, config.n_sink, config.recent, config.block
            )
            # A head whose output is 0 everywhere loses nothing by streaming.
            ratios[layer_idx] = torch.where(norm > 0, deviation / norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)

        capture_attention(model, torch.tensor([chunk]), on_layer)
        per_chunk.append(ratios.tolist())
    layers = torch.tensor(per_chunk, dtype=torch.float64).mean(dim=0)
    return {
        "method": "duo",
        "layers": layers.tolist(),
        "per_chunk": per_chunk,
        "kv_heads": kv_heads,
        "config": asdict(config),
    }


def pattern_summary(profile: dict) -> str:
    """One line about a profile from :func:`measure_head_patterns`: the deviation's spread over the
    heads and each layer's mean over its KV heads."""
    d = torch.tensor(profile["layers"], dtype=torch.float64)
    quartiles = torch.quantile(d.reshape(-1), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    spread = " / ".join(f"{x:.3g}" for x in quartiles.tolist())
    return f"streaming deviation min / q1 / median / q3 / max {spread}; per layer: " + " ".join(
        f"{x:.3g}" for x in d.mean(dim=1).tolist()
    )


def calibrate_duo(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out: str | os.PathLike[str],
    config: DuoConfig = DuoConfig(),
    *,
    text: str | None = None,
    text_source: str | None = None,
    model_name: str | None = None,
    progress: bool = False,
) -> dict:
    """Measure the head patterns of ``model`` on ``text`` and write the profile to ``out``.

    Args:
        model, tokenizer: the model and its tokenizer.
        out: where the JSON profile goes (read it with :meth:`zigzag.budget.DuoAttention.from_file`).
        config: what to measure.
        text: the calibration text; default: Python's standard-library docstrings (no evaluation
            haystack uses them).
        text_source: what the profile records as the text's origin (default: ``"python-stdlib-docstrings"``
            for the default text, else ``"text"``).
        model_name: what the profile records as the model (default: its ``name_or_path``).
        progress: a progress bar over chunks.

    Returns:
        The profile, as written (without the ``"about"`` record).
    """
    if text is None:
        text, source = stdlib_docstrings(), text_source or "python-stdlib-docstrings"
    else:
        source = text_source or "text"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    profile = measure_head_patterns(model, ids, config, progress=progress)
    save_profile(
        profile,
        out,
        model=model_name or getattr(model.config, "name_or_path", "") or type(model).__name__,
        model_type=model.config.model_type,
        dtype=str(next(model.parameters()).dtype),
        text=source,
        text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        text_tokens=len(ids),
    )
    return profile
