"""Context reconstruction (KVzip): how much the model needs each cached token to repeat the context.

Paper: https://arxiv.org/abs/2505.23416 ("KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction", Kim et al., 2025).

A query-agnostic scorer has to guess which tokens a question asked later will need. Reconstruction
asks the model itself: after the prefill, the context is fed a second time (teacher forcing: the true
tokens are the input, nothing is generated), after a short prompt asking for it to be repeated. To
reproduce a token that occurs once (a needle's digits), some reconstruction query has to attend to
it sharply; a token of repetitive filler is predictable from many places and its attention spreads.
A cached token's score is the largest softmax probability it receives from any reconstruction query,
over the query heads of its KV group.

The repeat runs in chunks of ``chunk_size`` context tokens. Each chunk is ``[prompt, chunk]``,
appended to the original cache (it sees the whole context) and removed again afterwards, so the
extra memory is one chunk's keys plus one block of attention probabilities, never a second context.
The cost is one more forward pass over the context, whose attention spans about twice as many keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from zigzag.kernels.precision import tf32_matmuls
from zigzag.pipeline.capture import values_to_output
from zigzag.pipeline.hf import (
    attention_modules,
    forward_hooks,
    output_projection,
    query_projection,
    query_shape,
    rope_fn,
    rotate_half,
    run_model,
)
from zigzag.scorers.critical import value_output_norms
from zigzag.scorers.kvzip import Reconstruction

PROBABILITY_BLOCK_ELEMENTS = 1 << 26
"""Most float32 attention probabilities held at once while scoring (256 MiB): queries are taken in
blocks small enough for this, whatever the batch and context length."""


def max_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor,
    query_valid: torch.Tensor,
    first_query_column: int,
    context: int,
    scaling: float,
    key_weight: torch.Tensor | None = None,
    query_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The largest attention probability each context key receives from a block of queries.

    With ``key_weight`` ``(batch, heads, context)`` and ``query_weight`` ``(batch, n)`` (KVzip+), each
    probability is first multiplied by the key's weight in that query head and by the query's weight.

    Args:
        queries: ``(batch, heads, n, head_dim)`` float32 after RoPE; ``heads`` is a multiple of
            ``kv_heads`` and query head ``h`` reads KV head ``h // (heads // kv_heads)``.
        keys: ``(batch, kv_heads, length, head_dim)`` the layer's keys, context first.
        key_valid: ``(batch, length)`` bool, False on padding.
        query_valid: ``(batch, n)`` bool, False for queries that must not count.
        first_query_column: the key column of query 0 (query ``t`` sees columns ``<= first + t``).
        context: the first ``context`` key columns are the ones scored.
        scaling: the softmax scale.

    Returns:
        ``(batch, kv_heads, context)`` float32: over the valid queries and the query heads of each
        KV group, the largest softmax probability (normalised over every key the query sees).
    """
    batch, heads, n, head_dim = queries.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    grouped = queries.reshape(batch, kv_heads, group, n, head_dim)
    keys = keys.float()
    columns = torch.arange(length, device=keys.device)
    best = keys.new_zeros(batch, kv_heads, context)
    step = max(1, PROBABILITY_BLOCK_ELEMENTS // max(1, batch * heads * length))
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = torch.arange(first_query_column + start, first_query_column + stop, device=keys.device)
        seen = key_valid[:, None, :] & (columns[None, None, :] <= rows[None, :, None])  # (batch, block, length)
        logits = torch.einsum("bkgqd,bkld->bkgql", grouped[:, :, :, start:stop], keys).mul_(scaling)
        logits.masked_fill_(~seen[:, None, None], float("-inf"))
        probs = logits.softmax(dim=-1)[..., :context]  # (batch, kv_heads, group, block, context)
        probs.mul_(query_valid[:, None, None, start:stop, None])
        if key_weight is not None:
            probs.mul_(key_weight.reshape(batch, kv_heads, group, 1, context))
        if query_weight is not None:
            probs.mul_(query_weight[:, None, None, start:stop, None])
        best = torch.maximum(best, probs.amax(dim=(2, 3)))
    return best


@dataclass
class _Repeat:
    """One repeated chunk's layout: ``[prompt, chunk]`` appended after ``context`` cached columns."""

    context: int  # padded width of the cached context
    prompt: int  # prompt tokens
    query_valid: torch.Tensor  # (batch, n) bool: the chunk's real tokens
    key_valid: torch.Tensor  # (batch, context + prompt + n) bool
    cos: torch.Tensor  # (batch, 1, n, head_dim) float32: RoPE of the chunk's queries, shared by all layers
    sin: torch.Tensor


class _Scores:
    """Hooks that turn each layer's reconstruction queries into a running max over chunks.

    With ``output_weights`` (KVzip+), probabilities are weighted by ``||v W_o^h||_2 / ||x_t||_2``:
    the norm of what the key's value writes to the residual stream through query head ``h``, over the
    norm of the repeated token's input to the attention (the normalized hidden state)."""

    def __init__(
        self, cache: DynamicCache, num_layers: int, heads: int, head_dim: int, output_weights: list[torch.Tensor] | None
    ):
        self.cache, self.heads, self.head_dim = cache, heads, head_dim
        self.best: list[torch.Tensor | None] = [None] * num_layers
        self.queries: dict[int, torch.Tensor] = {}
        self.repeat: _Repeat | None = None
        self.output_weights = output_weights
        self.value_norms: dict[int, torch.Tensor] = {}  # layer -> (batch, heads, context), once per call
        self.input_norms: dict[int, torch.Tensor] = {}  # layer -> (batch, n), per chunk

    def on_attention_input(self, layer: int):
        def hook(module, args, output):
            self.input_norms[layer] = torch.linalg.vector_norm(args[0][:, self.repeat.prompt :].float(), dim=-1)

        return hook

    def _key_weight(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        if layer not in self.value_norms:
            context = values[:, :, : self.repeat.context]
            batch, kv_heads = context.shape[:2]
            per_value = values_to_output(self.output_weights[layer], kv_heads, self.head_dim)
            self.value_norms[layer] = value_output_norms(context, per_value, p=2.0).reshape(batch, self.heads, -1)
        return self.value_norms[layer]

    def on_queries(self, layer: int):
        def hook(module, args, output):
            batch, seq = output.shape[:2]
            q = output.reshape(batch, seq, self.heads, self.head_dim)[:, self.repeat.prompt :]
            self.queries[layer] = q.transpose(1, 2).float()  # (batch, heads, n, head_dim) pre-RoPE

        return hook

    def after_attention(self, layer: int, scaling: float):
        def hook(module, args, output):
            repeat, keys = self.repeat, self.cache.layers[layer].keys
            q = self.queries.pop(layer)
            q = q * repeat.cos + rotate_half(q) * repeat.sin
            key_weight = query_weight = None
            if self.output_weights is not None:
                key_weight = self._key_weight(layer, self.cache.layers[layer].values)
                query_weight = 1.0 / self.input_norms.pop(layer).clamp(min=torch.finfo(torch.float32).tiny)
            with tf32_matmuls():
                found = max_attention(
                    q, keys, repeat.key_valid, repeat.query_valid, repeat.context + repeat.prompt, repeat.context, scaling,
                    key_weight, query_weight,
                )  # fmt: skip
            self.best[layer] = found if self.best[layer] is None else torch.maximum(self.best[layer], found)

        return hook


@torch.no_grad()
def reconstruction_scores(
    model: nn.Module,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    setup: Reconstruction,
    *,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Score every cached context token by context reconstruction (see the module docstring).

    Args:
        model: the model that filled ``cache``.
        cache: its ``DynamicCache`` over the context; layer ``l`` holds ``(batch, kv_heads, seq,
            head_dim)``. Left exactly as it was (each chunk's keys are removed again).
        input_ids: ``(batch, seq)`` long, the context (left padded).
        valid: ``(batch, seq)`` bool, False on left padding.
        setup: the prompt and chunk size.
        progress: show a progress bar over chunks.

    Returns:
        One ``(batch, kv_heads, seq)`` float32 tensor per layer, ``>= 0`` (in ``[0, 1]`` unless
        ``setup.output_weighted``); 0 on padding.
    """
    attentions = attention_modules(model)
    heads, _, head_dim = query_shape(model.config)
    batch, seq = input_ids.shape
    device = input_ids.device
    lengths = valid.sum(dim=-1)
    prompt = torch.tensor(setup.prompt_ids, dtype=torch.long, device=device).expand(batch, -1)
    weights = [output_projection(a).weight for a in attentions] if setup.output_weighted else None
    scores = _Scores(cache, len(attentions), heads, head_dim, weights)
    saved = [(layer.keys, layer.values) for layer in cache.layers]
    rope = rope_fn(model, saved[0][0])
    hooks = [(query_projection(a), scores.on_queries(i)) for i, a in enumerate(attentions)]
    if setup.output_weighted:
        hooks += [(a.q_proj, scores.on_attention_input(i)) for i, a in enumerate(attentions)]
    hooks += [(a, scores.after_attention(i, a.scaling)) for i, a in enumerate(attentions)]
    starts = range(0, seq, setup.chunk_size)
    with forward_hooks(hooks):
        for start in tqdm(starts, desc="reconstruction chunks", disable=not progress or len(starts) == 1):
            chunk_valid = valid[:, start : start + setup.chunk_size]
            appended_valid = torch.cat([torch.ones_like(prompt, dtype=torch.bool), chunk_valid], dim=-1)
            positions = lengths[:, None] + appended_valid.long().cumsum(dim=-1) - 1
            cos, sin = rope(positions[:, prompt.shape[1] :])  # once per chunk: every layer rotates alike
            scores.repeat = _Repeat(
                context=seq,
                prompt=prompt.shape[1],
                query_valid=chunk_valid,
                key_valid=torch.cat([valid, appended_valid], dim=-1),
                cos=cos[:, None],
                sin=sin[:, None],
            )
            try:
                run_model(
                    model,
                    cache,
                    input_ids=torch.cat([prompt, input_ids[:, start : start + setup.chunk_size]], dim=-1),
                    attention_mask=scores.repeat.key_valid.long(),
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=1,
                )
            finally:  # the chunk's keys go again, also when the forward pass fails
                for layer, (keys, values) in zip(cache.layers, saved):
                    layer.keys, layer.values = keys, values
    return [best.masked_fill_(~valid[:, None, :], 0.0) for best in scores.best]
