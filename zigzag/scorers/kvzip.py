"""KVzip: keep the tokens the model attends to most while it repeats the context.

The scorer only reads the scores; :class:`Reconstruction` says how the context is repeated, and
:mod:`zigzag.pipeline.reconstruction` (the model-running part) computes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from zigzag.scorers.base import LayerView, Scorer, ScorerWrapper

DEFAULT_PROMPT = "\n\nRepeat the previous context exactly.\n"
"""The text between the context and its repeat that :meth:`Reconstruction.from_text` tokenizes."""


@dataclass(frozen=True)
class Reconstruction:
    """How the context is repeated.

    Attributes:
        prompt_ids: token ids placed between the context and each repeated chunk (e.g. the tokenized
            :data:`DEFAULT_PROMPT`); empty: each chunk follows the context directly.
        chunk_size: context tokens repeated per forward pass (columns of the padded batch).
        output_weighted: KVzip+'s scores (:class:`KVzipPlus`): each probability times
            ``||v W_o^h||_2 / ||x_t||_2``, instead of KVzip's plain probabilities.
    """

    prompt_ids: tuple[int, ...] = ()
    chunk_size: int = 2048
    output_weighted: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int; got {self.chunk_size!r}")
        ids = tuple(self.prompt_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(f"prompt_ids must be non-negative token ids; got {self.prompt_ids!r}")
        object.__setattr__(self, "prompt_ids", ids)  # a list in, a hashable tuple kept
        if not isinstance(self.output_weighted, bool):
            raise TypeError(f"output_weighted must be a bool; got {self.output_weighted!r}")

    @classmethod
    def from_text(
        cls, tokenizer, text: str = DEFAULT_PROMPT, *, chunk_size: int = 2048, output_weighted: bool = False
    ) -> Reconstruction:
        """The prompt ``text`` tokenized without special tokens by ``tokenizer``."""
        return cls(tuple(tokenizer.encode(text, add_special_tokens=False)), chunk_size, output_weighted)


@dataclass
class KVzip(Scorer):
    """Score each token by the attention it gets when the model reconstructs the context.

    Paper: https://arxiv.org/abs/2505.23416 ("KVzip: Query-Agnostic KV Cache Compression with Context
    Reconstruction", Kim et al., 2025).

    The scores come from a second forward pass over the context that the pipeline runs after the
    prefill (:func:`zigzag.pipeline.reconstruction.reconstruction_scores`, configured by ``reconstruction``):
    a token's score is the largest softmax probability any repeated token's query, in any query head
    of its KV group, gives it. It reads no observation window, so the question may come later.

    Parameters
    ----------
    reconstruction:
        The prompt between the context and its repeat, and the chunk size. The default has no prompt
        (the registry cannot tokenize); ``KVzip(Reconstruction.from_text(tokenizer))`` asks for the
        repeat in words, as the paper does.
    """

    reconstruction: Reconstruction = field(default_factory=Reconstruction)

    name: ClassVar[str] = "kvzip"
    query_window: ClassVar[int] = 0
    needs_query_stats: ClassVar[bool] = False
    query_stats_skip: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if not isinstance(self.reconstruction, Reconstruction):
            raise TypeError(
                f"reconstruction must be a zigzag.pipeline.reconstruction.Reconstruction; got {type(self.reconstruction).__name__}"
            )
        if self.reconstruction.output_weighted and not self.output_weighted:
            # The scorer's name must say which scores it reads.
            raise ValueError("a reconstruction with output_weighted=True gives KVzip+ scores: use KVzipPlus")
        if self.output_weighted:
            self.reconstruction = replace(self.reconstruction, output_weighted=True)

    output_weighted: ClassVar[bool] = False

    def score(self, layer: LayerView) -> torch.Tensor:
        """Return the reconstruction scores the pipeline computed.

        Args:
            layer: the layer; reads ``reconstruction_scores: (batch, kv_heads, seq)``.

        Returns:
            ``(batch, kv_heads, seq)`` float32 in ``[0, 1]``; higher means keep.

        Raises:
            ValueError: the view carries no reconstruction scores (the prefill was run without
                ``reconstruction=``).
        """
        if layer.reconstruction_scores is None:
            raise ValueError(
                "KVzip needs reconstruction scores: run prefill_context(model, inputs, "
                "reconstruction=scorer.reconstruction) (compress_cache does this itself)"
            )
        return layer.reconstruction_scores


@dataclass
class KVzipPlus(KVzip):
    """KVzip with KVzip+'s normalization: the reconstruction's attention weighted by what each value
    writes to the residual stream.

    Paper: https://arxiv.org/abs/2601.07891 ("KVzap: Fast, Adaptive, and Faithful KV Cache Pruning",
    Jégou and Jeblick, 2026), which defines KVzip+ as the target its predictors learn.

    A token's score is the largest, over the repeated tokens ``t`` and the query heads ``h`` of its KV
    group, of ``a_{t,i} * ||v_i W_o^h||_2 / ||x_t||_2``: the attention probability times the norm of the
    value written through head ``h``'s slice of the output projection, over the norm of the repeated
    token's input to the attention (its normalized hidden state). A token with high attention but a
    value that writes little counts for little. Scores are ``>= 0``, not bounded by 1.

    The reconstruction always has ``output_weighted=True`` (set here, whatever was passed).
    """

    name: ClassVar[str] = "kvzip_plus"
    output_weighted: ClassVar[bool] = True


def with_reconstruction(scorer, reconstruction: Reconstruction):
    """``scorer`` with every :class:`KVzip` inside it (under any wrappers) set to ``reconstruction``.

    Useful where the registry name is known but the prompt needs a tokenizer:
    ``with_reconstruction(get_scorer("kvzip+pool7"), Reconstruction.from_text(tokenizer))``.
    Scorers without a KVzip inside come back unchanged.
    """
    if isinstance(scorer, KVzip):
        return replace(scorer, reconstruction=replace(reconstruction, output_weighted=scorer.output_weighted))
    inner = getattr(scorer, "inner", None)
    if isinstance(scorer, ScorerWrapper) and inner is not None:
        return replace(scorer, inner=with_reconstruction(inner, reconstruction))
    return scorer
