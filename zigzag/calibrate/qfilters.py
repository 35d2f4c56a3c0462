"""Q-Filters: per attention head, the main direction of the queries, measured once per model.

Paper: https://arxiv.org/abs/2503.02812 ("Q-Filters: Leveraging QK Geometry for Efficient KV Cache
Compression", Godey et al., 2025). The queries of a head are strongly anisotropic: one unit direction
``u`` carries a mean projection ``kappa = E[<q, u>] > 0`` and the mean of the queries has (almost) no
other component, so the attention logit a key ``k`` can expect from future queries is
``E[<q, k>] ~ kappa <k, u>``. ``u`` is the first right singular vector of the ``(tokens x head_dim)``
matrix of the head's calibration queries, oriented so that ``kappa > 0``; the scorer
:class:`zigzag.scorers.qfilters.QFilters` then projects the cached keys on it.

:func:`fit_qfilters` runs the model over calibration text in chunks of ``chunk_tokens`` (each chunk a
sequence of its own, positions ``0 .. chunk_tokens - 1``), takes every layer's queries from a forward
hook on the query projection (:func:`zigzag.pipeline.hf.query_projection`), rotates them with the
model's own rotary embedding (the keys are cached after RoPE, so the filters must live in the same
rotated space; kvpress applies its filters to the cached keys too), and accumulates, in float64, the
Gram matrix ``Q^T Q`` and the sum of the queries per (layer, query head). The top eigenvector of the
Gram matrix is the top right singular vector of ``Q``, so memory is
``O(layers * heads * head_dim ** 2)`` whatever the number of tokens.

``python -m zigzag.calibrate qfilters --model PATH --out filters.safetensors`` writes a profile;
:func:`load_qfilters` reads it back, :meth:`zigzag.scorers.qfilters.QFilters.from_file` builds the scorer.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from zigzag.pipeline.hf import (
    attention_modules,
    check_model,
    decoder_of,
    eval_mode,
    forward_hooks,
    query_projection,
    query_shape,
    rope_fn,
    rotate_half,
)

__all__ = ["QFilterConfig", "QFilterProfile", "fit_qfilters", "load_qfilters", "save_qfilters"]

FORMAT = "zigzag-qfilters/1"
"""Written into every file's metadata; :func:`load_qfilters` refuses files without it."""


@dataclass(frozen=True)
class QFilterConfig:
    """How :func:`fit_qfilters` measures. The defaults are zigzag's, not the paper's: they bound time
    and memory (SmolLM2-135M: about 6 CPU-minutes) and cover RoPE positions up to 2048. The filters
    live after RoPE, so ``chunk_tokens`` should reach the context lengths they will score: on SmolLM2,
    filters fitted on 512-token chunks rank the keys of a 1560-token haystack worse (Spearman 0.66
    against the true attention, per layer on average) than the defaults' (0.83).

    Attributes:
        chunk_tokens: tokens per forward pass and sequence (RoPE positions ``0 .. chunk_tokens - 1``).
        tokens: calibration tokens read at most, from the start of the text; a last partial chunk
            of at least ``chunk_tokens // 4`` tokens is read too.
        batch_size: chunks per forward pass.
    """

    chunk_tokens: int = 2048
    tokens: int = 65536
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")


@dataclass
class QFilterProfile:
    """The filters of one model, with what produced them.

    Attributes:
        filters: ``(layers, heads, head_dim)`` float32 unit vectors ``u``, one per query head, oriented
            so that the calibration queries' mean projection on each is ``>= 0``.
        scales: ``(layers, heads)`` float32, ``kappa``: that mean projection, ``mean_i <q_i, u>``.
        explained: ``(layers, heads)`` float32, ``sigma_1 ** 2 / ||Q||_F ** 2``: the share of the
            queries' energy along ``u`` (1: every query on the line of ``u``).
        kv_heads: the model's KV heads (query head ``h`` reads KV head ``h // (heads // kv_heads)``).
        about: what produced them: model, text, config, versions (free-form, JSON-serializable).
    """

    filters: torch.Tensor
    scales: torch.Tensor
    explained: torch.Tensor
    kv_heads: int
    about: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.filters.dim() != 3:
            raise ValueError(f"filters must be (layers, heads, head_dim); got {tuple(self.filters.shape)}")
        layers, heads, _ = self.filters.shape
        for name in ("scales", "explained"):
            if tuple(getattr(self, name).shape) != (layers, heads):
                raise ValueError(
                    f"{name} must be (layers, heads) = {(layers, heads)}; got {tuple(getattr(self, name).shape)}"
                )
        if (
            isinstance(self.kv_heads, bool)
            or not isinstance(self.kv_heads, int)
            or self.kv_heads < 1
            or heads % self.kv_heads
        ):
            raise ValueError(f"kv_heads must be a positive int dividing heads ({heads}); got {self.kv_heads!r}")


def _chunks(token_ids: Sequence[int], config: QFilterConfig) -> list[list[int]]:
    ids = list(token_ids[: config.tokens])
    size = config.chunk_tokens
    out = [ids[i : i + size] for i in range(0, len(ids), size)]
    if len(out) > 1 and len(out[-1]) < size // 4:
        out.pop()  # a short tail next to full chunks: too few positions to be worth a forward pass
    if not out or len(out[0]) < 2:
        raise ValueError(f"the calibration text has {len(ids)} tokens; Q-Filters need at least 2")
    return out


@dataclass
class _Moments:
    """Per layer, float64: ``gram (heads, d, d) = sum_i q_i q_i^T`` and ``total (heads, d) = sum_i q_i``
    over every calibration query after RoPE, and their count."""

    heads: int
    head_dim: int
    gram: dict[int, torch.Tensor] = field(default_factory=dict)
    total: dict[int, torch.Tensor] = field(default_factory=dict)
    cos: torch.Tensor | None = None  # (batch, seq, 1, head_dim) float64, this forward pass's RoPE
    sin: torch.Tensor | None = None

    def hook(self, layer_idx: int):
        def on_queries(module, args, output) -> None:
            batch, seq = output.shape[:2]
            q = output.detach().reshape(batch, seq, self.heads, self.head_dim).to(torch.float64)
            q = q * self.cos + rotate_half(q) * self.sin  # as the attention rotates them
            gram = torch.einsum("bshd,bshe->hde", q, q)
            total = q.sum(dim=(0, 1))
            if layer_idx in self.gram:
                self.gram[layer_idx] += gram
                self.total[layer_idx] += total
            else:
                self.gram[layer_idx], self.total[layer_idx] = gram, total

        return on_queries


@torch.no_grad()
def fit_qfilters(
    model: nn.Module,
    token_ids: Sequence[int],
    config: QFilterConfig = QFilterConfig(),
    *,
    progress: bool = False,
) -> QFilterProfile:
    """Measure every head's Q-Filter on calibration text (see the module docstring).

    Args:
        model: a supported decoder (see :func:`zigzag.compress_cache`), on its device.
        token_ids: the tokenized calibration text (no special tokens needed).
        config: chunking and how much text to read.
        progress: a progress bar over forward passes.

    Returns:
        The :class:`QFilterProfile` (``about`` holds the config and the number of tokens read); write
        it with :func:`save_qfilters`.
    """
    check_model(model)
    heads, kv_heads, head_dim = query_shape(model.config)
    attentions = attention_modules(model)
    chunks = _chunks(token_ids, config)
    # Batches of equal-length chunks (only the last chunk can be shorter): no padding anywhere.
    batches: list[list[list[int]]] = []
    for chunk in chunks:
        if batches and len(batches[-1]) < config.batch_size and len(batches[-1][0]) == len(chunk):
            batches[-1].append(chunk)
        else:
            batches.append([chunk])
    device = next(model.parameters()).device
    moments = _Moments(heads, head_dim)
    decoder = decoder_of(model)
    rope = None
    with eval_mode(model), forward_hooks((query_projection(a), moments.hook(i)) for i, a in enumerate(attentions)):
        for batch in tqdm(batches, desc="q-filters", disable=not progress):
            ids = torch.tensor(batch, device=device)
            positions = torch.arange(ids.shape[1], device=device).expand(ids.shape[0], -1)
            if rope is None:
                rope = rope_fn(model, next(model.parameters()))
            cos, sin = rope(positions)
            moments.cos, moments.sin = cos[:, :, None].double(), sin[:, :, None].double()
            # The decoder alone: the LM head's logits are never needed.
            decoder(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions, use_cache=False)
    count = sum(len(c) for c in chunks)
    filters, scales, explained = [], [], []
    for layer in range(len(attentions)):
        gram, total = moments.gram[layer].cpu(), moments.total[layer].cpu()
        values, vectors = torch.linalg.eigh(gram)  # ascending: the last is the top singular direction
        u = vectors[..., -1]  # (heads, d)
        kappa = (total * u).sum(-1) / count
        sign = torch.where(kappa < 0, -1.0, 1.0).to(torch.float64)
        filters.append(u * sign[:, None])
        scales.append(kappa * sign)
        trace = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)
        explained.append(values[..., -1].clamp_min(0) / trace.clamp_min(torch.finfo(torch.float64).tiny))
    return QFilterProfile(
        filters=torch.stack(filters).float(),
        scales=torch.stack(scales).float(),
        explained=torch.stack(explained).float(),
        kv_heads=kv_heads,
        about={"method": "qfilters", "tokens_read": count, "chunks": len(chunks), "config": asdict(config)},
    )


def save_qfilters(path: str | os.PathLike[str], profile: QFilterProfile, **about: object) -> None:
    """Write ``profile`` as safetensors (``filters``, ``scales``, ``explained``) whose metadata holds,
    as JSON, ``kv_heads``, the profile's ``about``, ``about`` given here (model, text, ...) and the
    versions."""
    from safetensors.torch import save_file

    layers, heads, head_dim = profile.filters.shape
    meta = {
        "format": FORMAT,
        "num_layers": layers,
        "heads": heads,
        "kv_heads": profile.kv_heads,
        "head_dim": head_dim,
        **profile.about,
        **about,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    tensors = {
        "filters": profile.filters.detach().float().cpu().contiguous(),
        "scales": profile.scales.detach().float().cpu().contiguous(),
        "explained": profile.explained.detach().float().cpu().contiguous(),
    }
    save_file(tensors, os.fspath(path), metadata={"zigzag": json.dumps(meta)})


def load_qfilters(path: str | os.PathLike[str]) -> QFilterProfile:
    """Read a file written by :func:`save_qfilters`.

    Raises:
        ValueError: the file is not a Q-Filters profile (no zigzag metadata, or tensors missing).
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("zigzag", "{}"))
        names = set(f.keys())
        if meta.get("format") != FORMAT or not {"filters", "scales", "explained"} <= names:
            raise ValueError(
                f"{path} is not a Q-Filters profile (write one with `python -m zigzag.calibrate qfilters`)"
            )
        tensors = {name: f.get_tensor(name) for name in ("filters", "scales", "explained")}
    return QFilterProfile(kv_heads=int(meta["kv_heads"]), about=meta, **tensors)
