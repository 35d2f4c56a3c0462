"""The two entry points: :func:`compress_cache` and :func:`prefill_context`.

Both validate their arguments, resolve names into a scorer, a budget allocator and a merge, and run
the pipeline (:mod:`zigzag.pipeline`): one :class:`~zigzag.pipeline.plan.BudgetPlan` per
compression, whichever path runs it.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from zigzag.budget import BudgetAllocator
from zigzag.cache import ZigZagCache
from zigzag.pipeline.capture import query_stats_skip, query_window_needed
from zigzag.pipeline.decoding import Decoding, attach_decoding
from zigzag.pipeline.full import Prefill, run_prefill
from zigzag.pipeline.hf import attention_modules, check_model, eval_mode, output_projection, query_shape, rope_fn
from zigzag.pipeline.inputs import DEFAULT_BUDGET, DEFAULT_SCORER, as_context, check_keep, resolve_methods
from zigzag.pipeline.layerwise import LayerwiseCompressor, chunk_bounds
from zigzag.scorers import Reconstruction, Scorer


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
        A :class:`~zigzag.pipeline.full.Prefill`; ``prefill.compress(ratio, scorer, budget)`` gives a
        :class:`~zigzag.cache.ZigZagCache`, as often as you like.
    """
    check_model(model)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be a non-negative int; got {window!r}")
    if query_stats_skip is not None and (isinstance(query_stats_skip, bool) or not isinstance(query_stats_skip, int) or query_stats_skip < 0):
        raise ValueError(f"query_stats_skip must be a non-negative int or None; got {query_stats_skip!r}")
    if reconstruction is not None and not isinstance(reconstruction, Reconstruction):
        raise TypeError(f"reconstruction must be a zigzag.scorers.Reconstruction or None; got {type(reconstruction).__name__}")
    ctx = as_context(inputs, _device_of(model))
    return run_prefill(model, ctx, window=window, query_stats_skip=query_stats_skip, reconstruction=reconstruction, progress=progress)


@torch.no_grad()
def compress_cache(
    model: nn.Module,
    inputs,
    ratio: float | None = None,
    scorer: str | Scorer = DEFAULT_SCORER,
    budget: str | BudgetAllocator = DEFAULT_BUDGET,
    *,
    max_tokens: int | None = None,
    merge=None,
    chunk_size: int | None = None,
    decoding: Decoding | None = None,
    progress: bool = False,
) -> ZigZagCache:
    """Prefill ``inputs`` and return a compressed cache that keeps ``1 - ratio`` of it (or ``max_tokens``).

    Each layer is compressed right after its attention ran, so the whole uncompressed cache never
    exists; the result is the same as ``prefill_context(model, inputs).compress(ratio, scorer, budget,
    merge=merge)``.

    Args:
        model: a Hugging Face causal LM (Llama, Mistral without sliding window, Qwen2, Qwen3) using
            ``"sdpa"`` or ``"eager"`` attention. It is left exactly as it was; a model in train mode is
            compressed in eval mode (no dropout) and put back in train mode.
        inputs: tokenizer output (``input_ids`` and optional ``attention_mask``, ``(batch, seq)``,
            left padded) or a ``(batch, seq)`` / ``(seq,)`` LongTensor of ids.
        ratio: fraction of the cache removed, in ``[0, 1)``. Row ``b`` (``T_b`` real tokens) keeps
            ``num_layers * floor((1 - ratio) * T_b)`` tokens per KV head (computed exactly: 100 tokens at
            ratio 0.9 keep 10 per layer), shared across layers by ``budget``.
        max_tokens: instead of ``ratio``, tokens kept per KV head on average over the layers: row ``b``
            keeps ``num_layers * min(max_tokens, T_b)``. Give exactly one of the two.
        scorer: a name from ``zigzag.scorers.SCORERS`` with optional wrapper suffixes, or a scorer
            object (higher score = keep). Default: ``"expected_attention+pool25"``.
        budget: a name from ``zigzag.budget.BUDGETS`` with optional suffixes, or an allocator object.
            Default: ``"uniform"``.
        merge: None (evicted tokens are dropped), ``"cosine"`` or a merge object such as
            ``CosineMerge(threshold=0.2, preserve_mass=True)``: evicted tokens are folded into the most
            similar survivor's value; with ``preserve_mass``, attention adds ``log(count)`` to each
            survivor's logit.
        chunk_size: prefill at most this many tokens per forward pass. After each chunk every layer
            is cut back to ``(1 - ratio)`` of the tokens seen so far, or ``max_tokens`` (uniformly: the allocator only
            shares the last chunk's budget, between what the layers then hold), so peak memory is
            the budget plus one chunk, not the context. Scorers see each chunk's own queries. None
            (default): one pass, and the result equals ``prefill_context(...).compress(...)``.
        decoding: compress while generating too (:class:`~zigzag.Decoding`): every ``interval``
            appended tokens, each row is cut back to ``max_tokens`` tokens per KV head on average over
            layers, by the decoding's scorer and budget (default: this call's). ``ratio=0.0`` keeps the
            prompt whole until the first event. The events are in ``cache.events``.
        progress: show a progress bar over layers.

    Scorers that reconstruct the context (:class:`~zigzag.scorers.KVzip`) need the whole context
    cached before any layer can be scored: for them this runs ``prefill_context(...,
    reconstruction=scorer.reconstruction).compress(...)``, and peak memory is the full cache.

    Returns:
        A :class:`~zigzag.cache.ZigZagCache`. Continue with ``model.generate(input_ids=cat(context,
        question), attention_mask=..., cache=cache)`` (``past_key_values=cache`` on transformers
        versions before the rename): positions continue from ``seq``.

    Raises:
        ValueError / TypeError: a bad argument (the message names it and what is allowed);
            :class:`~zigzag.UnsupportedModelError` for a model zigzag cannot compress exactly.
    """
    keep = check_keep(ratio, max_tokens)
    scorer, allocator, merger = resolve_methods(scorer, budget, merge)
    check_model(model)
    if decoding is not None and not isinstance(decoding, Decoding):
        raise TypeError(f"decoding must be a zigzag.Decoding or None; got {type(decoding).__name__}")
    if decoding is not None and merger is not None:
        raise ValueError("merge is not supported with decoding yet: evicted tokens are dropped while generating")
    cache = _compress(model, inputs, keep, scorer, allocator, merger, chunk_size, progress)
    if decoding is not None:
        ctx = as_context(inputs, _device_of(model))
        d_scorer, d_allocator, _ = resolve_methods(decoding.scorer or scorer, decoding.budget or allocator, None)
        attach_decoding(
            cache, decoding, d_scorer, d_allocator, rope=rope_fn(model, cache.layers[0].keys),
            scalings=[a.scaling for a in attention_modules(model)], heads=query_shape(model.config)[0],
            output_weights=[output_projection(a).weight for a in attention_modules(model)],
            left_padding=ctx.seq - ctx.lengths,
            prompt_length=cache.get_seq_length(),
        )  # fmt: skip
    return cache


def _compress(model, inputs, keep, scorer, allocator, merger, chunk_size, progress) -> ZigZagCache:
    """:func:`compress_cache` after validation, without the decoding."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    repeat = getattr(scorer, "reconstruction", None)
    if repeat is not None:
        # Reconstruction needs the whole context cached before any layer can be scored.
        if chunk_size is not None:
            raise ValueError(f"{scorer.name} (context reconstruction) cannot be combined with chunk_size")
        pre = prefill_context(
            model, inputs, window=query_window_needed(scorer, allocator), query_stats_skip=query_stats_skip(scorer),
            reconstruction=repeat, progress=progress,
        )  # fmt: skip
        return pre.compress(keep.ratio, scorer, allocator, max_tokens=keep.max_tokens, merge=merger, progress=progress)
    ctx = as_context(inputs, _device_of(model))
    bounds = chunk_bounds(ctx.seq, chunk_size)
    if len(bounds) > 1:
        if merger is not None:
            raise ValueError("merge is not supported with chunk_size yet: merge after an unchunked prefill")
        wanted = query_window_needed(scorer, allocator)
        if chunk_size < wanted:
            raise ValueError(
                f"chunk_size must be at least the {wanted} last queries {scorer.name} / {allocator.name} read; got {chunk_size}"
            )
        if allocator.granularity == "split":
            raise ValueError(f"budget {allocator.name!r} (head-wise: split across heads by score) is not supported with chunk_size yet")
    work = LayerwiseCompressor(model, ctx, keep, scorer, allocator, merger, progress)
    with eval_mode(model):
        for k, (start, end) in enumerate(tqdm(bounds, desc="chunks", disable=not progress or len(bounds) == 1)):
            work.run_chunk(start, end, final=k == len(bounds) - 1)
    return work.finalize()
