"""Per-layer sensitivity: how much the model's predictions change when one layer alone is compressed.

The measurement behind :class:`zigzag.budget.Sensitivity`. For each calibration sample, a context of
``context_tokens`` tokens is followed by a copy of one of its own spans (``copy_tokens`` long, at a
depth spread evenly over the samples). Once the first ``cue_tokens`` of the copy have been read, a
model that can look back predicts the rest almost surely: the continuation tests retrieval from
anywhere in the context, the ability that compression puts at risk.

For each layer ``l``: compress layer ``l`` alone to ``keep_fraction`` of the context with ``scorer``
(every other layer keeps everything), teacher-force the copy, and measure the KL divergence from
the uncompressed model's next-token distributions, averaged over the predicted copy tokens and the
samples:

``s_l = mean_{samples, positions} KL(p_full || p_l)``, ``(num_layers,)`` float64, ``>= 0``.

One prefill per batch serves all layers (:meth:`zigzag.Prefill.compress`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from zigzag.api import prefill_context
from zigzag.budget.base import BudgetAllocator, check_allocate_args
from zigzag.calibrate.texts import window_starts
from zigzag.pipeline.hf import cache_kwarg, decoder_of, eval_mode
from zigzag.pipeline.inputs import DEFAULT_SCORER

__all__ = ["SensitivityConfig", "copy_samples", "measure_sensitivity", "save_profile"]


@dataclass(frozen=True)
class SensitivityConfig:
    """How :func:`measure_sensitivity` measures.

    Attributes:
        scorer: the scorer that picks the kept tokens of the compressed layer (a registry name).
        keep_fraction: share of the context the compressed layer keeps, in ``(0, 1)``.
        context_tokens: tokens of each calibration context.
        copy_tokens: tokens of the copied span that follows it.
        cue_tokens: first tokens of the copy that are read, not scored (the model finds the span).
        samples: calibration samples; ``batch_size`` of them are prefilled together.
        seed: picks the contexts' offsets in the text.
    """

    scorer: str = DEFAULT_SCORER
    keep_fraction: float = 0.25
    context_tokens: int = 2048
    copy_tokens: int = 96
    cue_tokens: int = 16
    samples: int = 8
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_fraction < 1.0:
            raise ValueError(f"keep_fraction must lie in (0, 1); got {self.keep_fraction}")
        if not 0 < self.cue_tokens < self.copy_tokens:
            raise ValueError(f"need 0 < cue_tokens < copy_tokens; got {self.cue_tokens}, {self.copy_tokens}")
        if self.context_tokens < 2 * self.copy_tokens:
            raise ValueError(f"context_tokens must be at least 2 * copy_tokens; got {self.context_tokens}")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("samples and batch_size must be at least 1")


@dataclass(frozen=True)
class _OneLayer(BudgetAllocator):
    """Every layer keeps its whole row except ``layer``, which takes what the total leaves.

    With ``max_tokens = M`` the total is ``L * M``, so ``layer`` keeps ``L * M - (L - 1) * seq_len``.
    """

    layer: int = 0
    name: ClassVar[str] = "one_layer"

    def allocate(self, avg_budget, seq_len, num_layers: int, lmba=None) -> torch.Tensor:
        avg, seq, _ = check_allocate_args(avg_budget, seq_len, num_layers, lmba, needs_lmba=False)
        out = seq[:, None].expand(avg.shape[0], num_layers).clone()
        out[:, self.layer] = num_layers * avg - (num_layers - 1) * seq
        if bool((out[:, self.layer] < 0).any()):
            raise ValueError("the budget is too small to compress one layer alone")
        return out


def _one_layer_max_tokens(seq: int, keep: int, num_layers: int) -> int:
    """``max_tokens`` for which :class:`_OneLayer` keeps at most ``keep`` (and within ``num_layers``
    of it) in its layer, all rows being ``seq`` long."""
    return seq - -(-(seq - keep) // num_layers)


def copy_samples(token_ids: Sequence[int], config: SensitivityConfig) -> list[tuple[list[int], list[int]]]:
    """``(context, copy)`` token lists cut from one long token stream.

    Contexts start at offsets drawn with ``config.seed`` (without overlap when the stream allows);
    sample ``i`` copies the span starting at depth ``i / samples`` of the usable range.
    """
    span, n = config.context_tokens, config.samples
    if len(token_ids) < span:
        raise ValueError(f"the calibration text has {len(token_ids)} tokens; a context needs {span}")
    starts = window_starts(len(token_ids), span, n, config.seed)
    out = []
    lo, hi = config.copy_tokens, span - 2 * config.copy_tokens  # away from the start and the end
    for i, start in enumerate(starts):
        ctx = list(token_ids[start : start + span])
        at = lo + round((hi - lo) * i / max(n - 1, 1))
        out.append((ctx, ctx[at : at + config.copy_tokens]))
    return out


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    token_ids: Sequence[int],
    config: SensitivityConfig = SensitivityConfig(),
    *,
    progress: bool = False,
) -> dict:
    """Measure each layer's sensitivity to compression (see the module docstring).

    Args:
        model: a supported decoder (see :func:`zigzag.compress_cache`), on its device.
        token_ids: the tokenized calibration text, at least ``config.context_tokens`` long.
        config: what to measure.
        progress: a progress bar over batches and layers.

    Returns:
        The profile: ``{"layers": [s_0, ..., s_{L-1}], "per_sample": (samples, L) nested list,
        "uncompressed_nll": mean NLL of the copied tokens, "config": ...}``; write it with
        :func:`save_profile`.
    """
    num_layers = len(decoder_of(model).layers)
    samples = copy_samples(token_ids, config)
    device = next(model.parameters()).device
    seq = config.context_tokens
    keep = max(1, round(config.keep_fraction * seq))
    max_tokens = _one_layer_max_tokens(seq, keep, num_layers)
    per_sample: list[list[float]] = []
    nll: list[float] = []
    bar = tqdm(total=-(-len(samples) // config.batch_size) * (num_layers + 1), desc="sensitivity", disable=not progress)
    with eval_mode(model):
        for b in range(0, len(samples), config.batch_size):
            batch = samples[b : b + config.batch_size]
            ctx_ids = torch.tensor([c for c, _ in batch], device=device)
            copy = torch.tensor([c for _, c in batch], device=device)
            ctx = {"input_ids": ctx_ids, "attention_mask": torch.ones_like(ctx_ids)}
            pre = prefill_context(model, ctx)
            mask = torch.ones(len(batch), seq + copy.shape[1], dtype=torch.long, device=device)
            positions = torch.arange(seq, seq + copy.shape[1], device=device).expand(len(batch), -1)

            def log_probs(cache, copy=copy, mask=mask, positions=positions) -> torch.Tensor:
                logits = model(
                    input_ids=copy, attention_mask=mask, position_ids=positions, **cache_kwarg(model, cache)
                ).logits
                # position j predicts copy token j + 1; the first cue_tokens tokens are read, not scored
                return logits[:, config.cue_tokens - 1 : -1].double().log_softmax(-1)

            full = log_probs(pre.compress(max_tokens=seq, scorer=config.scorer, budget="uniform"))
            target = copy[:, config.cue_tokens :]
            nll += (-full.gather(-1, target[..., None])[..., 0].mean(-1)).tolist()
            bar.update(1)
            rows = torch.zeros(len(batch), num_layers, dtype=torch.float64)
            for layer in range(num_layers):
                cache = pre.compress(max_tokens=max_tokens, scorer=config.scorer, budget=_OneLayer(layer=layer))
                lp = log_probs(cache)
                rows[:, layer] = (full.exp() * (full - lp)).sum(-1).mean(-1).clamp_min(0).cpu()
                bar.update(1)
            per_sample += rows.tolist()
            del pre
    bar.close()
    layers = torch.tensor(per_sample, dtype=torch.float64).mean(0)
    return {
        "method": "sensitivity",
        "layers": layers.tolist(),
        "per_sample": per_sample,
        "uncompressed_nll": sum(nll) / len(nll),
        "kept_in_compressed_layer": num_layers * max_tokens - (num_layers - 1) * seq,
        "config": asdict(config),
    }


def save_profile(profile: dict, path: str | os.PathLike[str], **about: object) -> None:
    """Write ``profile`` as JSON with what produced it (``about``: model, text, ...) and the versions."""
    meta = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **about,
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**profile, "about": meta}, f, indent=1)
        f.write("\n")
