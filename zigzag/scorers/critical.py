"""CriticalKV: weigh another scorer's attention scores by how much each value can move the output."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zigzag.scorers.base import LayerView, Scorer, ScorerWrapper
from zigzag.scorers.window import raise_protected

OUTPUT_BLOCK_ELEMENTS = 1 << 26
"""Most float32 elements of projected values ``v @ W_o`` held at once (256 MiB): values are projected
in blocks of tokens small enough for this."""


def value_output_norms(values: torch.Tensor, output_weight: torch.Tensor, p: float = 1.0) -> torch.Tensor:
    """The ``p``-norm of what each cached value writes to the residual stream, per query head.

    Args:
        values: ``(batch, kv_heads, seq, head_dim)``.
        output_weight: ``(batch or 1, kv_heads, groups, head_dim, hidden)``
            (:attr:`~zigzag.scorers.LayerView.output_weight`).
        p: the norm (1 for CriticalKV, 2 for KVzip+).

    Returns:
        ``(batch, kv_heads, groups, seq)`` float32: ``||v @ W_o^h||_p`` for query head ``h = (g, j)``.
    """
    batch, kv_heads, seq, _ = values.shape
    groups, hidden = output_weight.shape[2], output_weight.shape[-1]
    weight = output_weight.float()
    norms = values.new_empty(batch, kv_heads, groups, seq, dtype=torch.float32)
    step = max(1, OUTPUT_BLOCK_ELEMENTS // max(1, batch * kv_heads * groups * hidden))
    for start in range(0, seq, step):
        block = values[:, :, start : start + step].float()
        projected = torch.einsum("bksd,bkgdh->bkgsh", block, weight.expand(batch, *weight.shape[1:]))
        norms[..., start : start + step] = torch.linalg.vector_norm(projected, ord=p, dim=-1)
    return norms


@dataclass
class CriticalKV(ScorerWrapper):
    """Two-stage selection: the inner scorer's best tokens first, then attention times output norm.

    Paper: https://arxiv.org/abs/2502.03805 ("Identify Critical KV Cache in LLM Inference from an
    Output Perturbation Perspective", Feng et al., 2025). A token's effect on the attention output is
    bounded by its attention weight times ``||v W_o||_1``, the L1 norm of what its value writes through
    the output projection, so a token with a large weight but a small projected value matters little.

    For each row and KV head, with inner scores ``s`` (attention-like, ``>= 0``):

    1. Stage one: the ``floor(first_stage * mean_budget)`` valid tokens with the highest ``s`` are
       lifted above all others (``mean_budget`` is :attr:`~zigzag.scorers.LayerView.mean_budget`, the
       tokens per KV head the compression keeps on average; the paper's stage-one share of the budget
       is 0.5).
    2. Stage two: every token is scored ``(s + epsilon) * n``, where ``n`` is ``||v W_o^h||_1``
       averaged over the query heads ``h`` of the KV group; lifted tokens keep this order among
       themselves.

    Where the view carries no budget (``mean_budget`` None), stage one is skipped. Combined with
    head-wise budgets (``budget="adakv"``) it is the paper's CriticalAdaKV; there the heads' shares
    are split from these final scores, where the paper splits them from the inner scores.

    Args:
        inner: an attention-based scorer (SnapKV, TOVA, ExpectedAttention without its value norm,
            ObservedAttention...). Its scores must be ``>= 0`` on valid tokens: a negative score (Knorm's
            ``-||k||``) would turn the product's order upside down, and raises ``ValueError``.
        first_stage: share of the average budget chosen in stage one, in ``[0, 1]``; 0 is stage two only.
        epsilon: added to the scores before the product, ``>= 0`` (the reference implementation's 1e-4).
    """

    inner: Scorer
    first_stage: float = 0.5
    epsilon: float = 1e-4

    def __post_init__(self) -> None:
        if isinstance(self.first_stage, bool) or not 0.0 <= float(self.first_stage) <= 1.0:
            raise ValueError(f"first_stage must be in [0, 1] (share of the budget chosen in stage one); got {self.first_stage!r}")
        if isinstance(self.epsilon, bool) or not float(self.epsilon) >= 0.0:
            raise ValueError(f"epsilon must be a number >= 0; got {self.epsilon!r}")

    @property
    def name(self) -> str:
        return self.inner.name + "+critical"

    def score(self, layer: LayerView) -> torch.Tensor:
        """``(batch, kv_heads, seq)`` float32 CriticalKV scores.

        Reads the inner scorer's needs plus ``values``, ``valid``, ``output_weight`` and
        ``mean_budget``. Raises ``ValueError`` when the view has no ``output_weight`` or the inner
        scores are negative.
        """
        if layer.output_weight is None:
            raise ValueError(
                "CriticalKV needs LayerView.output_weight (the layer's output projection); the pipeline passes it "
                "for every model, a hand-built view must set it"
            )
        scores = self.inner.score(layer).float()
        valid = layer.valid.to(device=scores.device, dtype=torch.bool)[:, None, :].expand_as(scores)
        if bool((scores[valid] < 0).any()):
            raise ValueError(
                f"CriticalKV multiplies attention-like scores by value norms; {self.inner.name} gave negative scores"
            )
        norms = value_output_norms(layer.values, layer.output_weight.to(scores.device), p=1.0).mean(dim=2)
        weighted = (scores + self.epsilon) * norms
        if layer.mean_budget is None or self.first_stage == 0:
            return weighted
        first = (self.first_stage * layer.mean_budget.to(scores.device).double()).floor().long()  # (batch,)
        order = scores.masked_fill(~valid, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
        chosen = valid & (rank < first[:, None, None])
        return raise_protected(weighted, chosen, layer.valid.to(device=scores.device, dtype=torch.bool))
