"""Q-Filters: the attention a key can expect, from its projection on the queries' main direction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from zigzag.scorers.base import LayerView, Scorer
from zigzag.scorers.window import raise_protected


@dataclass(eq=False)
class QFilters(Scorer):
    """Score each cached key by the attention logit that future queries are estimated to give it.

    Paper: https://arxiv.org/abs/2503.02812 ("Q-Filters: Leveraging QK Geometry for Efficient KV Cache
    Compression", Godey et al., 2025).

    Per layer ``l`` and query head ``h`` the filter is a unit vector ``u_{l,h}``: the first right
    singular vector of the head's calibration queries after RoPE, oriented so that their mean projection
    on it, the scale ``kappa_{l,h} = mean_i <q_i, u_{l,h}>``, is ``>= 0``. The paper observes that the
    mean query lies along ``u``, so a future query gives key ``k`` the logit
    ``E[<q, k>] * scaling ~ kappa <k, u> * scaling`` on average. The score of key ``k`` in KV head
    ``g`` at layer ``l = layer.layer_idx`` is that estimate averaged over the ``G = heads // kv_heads``
    query heads of the group (``h // G == g``)::

        score(k) = scaling * (1 / G) * sum_{h in group g} kappa_{l,h} * <k, u_{l,h}>

    with ``scaling`` the layer's softmax scale (``layer.scaling``) and ``k`` the key as cached (after
    RoPE). A larger estimated logit means more attention: higher = keep. With ``G = 1`` the score is
    the paper's projection ``<k, u>`` times a positive factor; the scales only weigh the heads of a
    group against each other. kvpress's ``QFilterPress`` scores ``-<f, k>`` with the filters ``f`` it
    downloads (for that to keep the most attended keys, ``f`` must point away from the mean query);
    these point toward it, hence no minus sign.
    The first ``n_sink`` tokens (positions ``< n_sink``) can be lifted above every other token.

    The filters come from :func:`zigzag.calibrate.fit_qfilters` (``python -m zigzag.calibrate qfilters``);
    :meth:`from_file` reads the file it writes. Nothing is read from the prompt but the keys, so the
    score of a token depends on its key alone (no queries, no attention maps).

    Chunked prefill hands the scorer one row per (row, KV head), ``kv_heads == 1``
    (:func:`zigzag.pipeline.capture.layer_view`): a view with one KV head, ``self.kv_heads > 1`` and
    a batch that ``self.kv_heads`` divides is read that way, row ``r`` being KV head ``r % kv_heads``.

    Parameters
    ----------
    filters:
        ``(layers, heads, head_dim)`` float: ``u`` per layer and query head (normalized here).
    kv_heads:
        The model's KV heads; must divide ``heads``.
    scales:
        ``(layers, heads)`` float ``>= 0``: ``kappa`` per head; None gives every head weight 1.
    n_sink:
        Leading tokens always kept. 0 by default, as in kvpress's ``QFilterPress``; the paper's
        generation setup builds on StreamingLLM's cache, which keeps the first tokens: give
        ``n_sink`` (or the ``+first<n>`` wrapper) for that.
    """

    filters: torch.Tensor | None = field(default=None, repr=False)
    kv_heads: int | None = None
    scales: torch.Tensor | None = field(default=None, repr=False)
    n_sink: int = 0

    name: ClassVar[str] = "qfilters"
    query_window: ClassVar[int] = 0
    needs_query_stats: ClassVar[bool] = False
    query_stats_skip: ClassVar[int] = 0
    calibrated: ClassVar[bool] = True
    """Built from filters measured offline (never from defaults alone)."""

    def __post_init__(self) -> None:
        if self.filters is None:
            raise ValueError(
                "qfilters needs calibrated filters: QFilters.from_file(path), or QFilters(filters=..., "
                "kv_heads=...); write a file with `python -m zigzag.calibrate qfilters --model ... --out ...`"
            )
        filters = self.filters
        if not isinstance(filters, torch.Tensor) or not filters.is_floating_point() or filters.dim() != 3:
            raise ValueError(f"filters must be a float tensor (layers, heads, head_dim); got {_describe(filters)}")
        if filters.numel() == 0 or not bool(torch.isfinite(filters).all()):
            raise ValueError("filters must be non-empty and finite")
        layers, heads, _ = filters.shape
        norms = torch.linalg.vector_norm(filters.double(), dim=-1)
        if not bool((norms > 0).all()):
            raise ValueError("every filter must be a non-zero vector")
        if isinstance(self.kv_heads, bool) or not isinstance(self.kv_heads, int) or self.kv_heads < 1:
            raise ValueError(f"kv_heads must be a positive int (the model's KV heads); got {self.kv_heads!r}")
        if heads % self.kv_heads:
            raise ValueError(f"the filters' heads ({heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.scales is None:
            scales = torch.ones(layers, heads, dtype=torch.float64)
        else:
            scales = self.scales
            if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (layers, heads):
                raise ValueError(
                    f"scales must be a tensor (layers, heads) = {(layers, heads)}; got {_describe(scales)}"
                )
            scales = scales.double()
            if not bool((torch.isfinite(scales) & (scales >= 0)).all()):
                raise ValueError(
                    "scales must be finite and >= 0 (a mean projection on a filter oriented to make it so)"
                )
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an int >= 0 (number of sink tokens kept); got {self.n_sink!r}")
        unit = filters.detach().double().cpu() / norms.cpu()[..., None]
        self.filters = unit.float()
        self.scales = scales.detach().cpu().float()
        groups = heads // self.kv_heads
        # The group's mean of linear estimates is one linear map: one vector per (layer, KV head).
        weighted = unit * scales.detach().cpu()[..., None]
        self._weights = weighted.reshape(layers, self.kv_heads, groups, -1).mean(dim=2).float()
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **options: int) -> QFilters:
        """The scorer for the profile at ``path`` (written by :func:`zigzag.calibrate.save_qfilters`),
        with ``options`` (``n_sink``)."""
        from zigzag.calibrate.qfilters import load_qfilters  # zigzag.calibrate imports the scorers

        profile = load_qfilters(path)
        return cls(filters=profile.filters, kv_heads=profile.kv_heads, scales=profile.scales, **options)

    @property
    def num_layers(self) -> int:
        return self.filters.shape[0]

    @property
    def heads(self) -> int:
        return self.filters.shape[1]

    @property
    def head_dim(self) -> int:
        return self.filters.shape[2]

    def _weights_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:
            self._on_device[device] = self._weights.to(device)
        return self._on_device[device]

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return the estimated attention logits.

        Args:
            layer: the layer; reads ``keys: (batch, kv_heads, seq, head_dim)``, ``scaling``,
                ``layer_idx`` and ``num_layers`` (and ``valid``/``positions: (batch, seq)`` for
                the sinks).

        Returns:
            ``(batch, kv_heads, seq)`` float32; higher means keep.

        Raises:
            ValueError: the layer does not match the filters (layer count or index, KV heads, head
                size, query heads of ``window_queries``).
        """
        keys = layer.keys
        batch, kv_heads, _, head_dim = keys.shape
        if layer.num_layers != self.num_layers or not 0 <= layer.layer_idx < self.num_layers:
            raise ValueError(
                f"the Q-Filters were fitted on a model with {self.num_layers} layers; got layer {layer.layer_idx} "
                f"of {layer.num_layers}"
            )
        if head_dim != self.head_dim:
            raise ValueError(f"the Q-Filters have head_dim {self.head_dim}; the layer's keys have {head_dim}")
        queries = layer.window_queries
        if queries is not None and queries.shape[1] * self.kv_heads != self.heads * kv_heads:
            raise ValueError(
                f"the Q-Filters have {self.heads} query heads; the layer's window queries have {queries.shape[1]}"
            )
        weights = self._weights_on(keys.device)[layer.layer_idx]  # (kv_heads, head_dim)
        if kv_heads == self.kv_heads:
            w = weights[None]
        elif kv_heads == 1 and self.kv_heads > 1 and batch % self.kv_heads == 0:
            w = weights.repeat(batch // self.kv_heads, 1)[:, None]  # row r: KV head r % kv_heads
        else:
            raise ValueError(f"the Q-Filters have {self.kv_heads} KV heads; the layer has {kv_heads} (batch {batch})")
        scores = torch.matmul(keys.to(torch.float32), w[..., None]).squeeze(-1) * layer.scaling
        if self.n_sink == 0:
            return scores
        valid = layer.valid.to(device=keys.device, dtype=torch.bool)
        sinks = valid & (layer.positions.to(keys.device) < self.n_sink)
        return raise_protected(scores, sinks, valid)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
