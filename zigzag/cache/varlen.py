"""A compressed layer whose KV heads physically hold different numbers of tokens (head-wise budgets).

With head-wise budgets (AdaKV), the heads of one layer keep different numbers of tokens. The dense
:class:`~zigzag.cache.CompressedLayer` stores ``(batch, kv_heads, widest head, head_dim)`` and masks
the empty slots, so memory is that of the widest head. :class:`VarlenLayer` stores instead every
``(row, kv head)`` segment back to back:

    prefix_keys / prefix_values: (total, head_dim),  total = sum of the per-(row, head) budgets
    offsets:                      (batch * kv_heads + 1,) long; segment z = row * kv_heads + head
                                  occupies slots offsets[z] : offsets[z + 1]
    positions:                    (total,) int32, the input_ids column each slot came from (ascending
                                  inside a segment)
    prefix_bias:                  (total,) float32 log(count) of merged survivors, or None

so memory is the sum of the budgets plus 4 bytes per slot and 8 bytes per segment of index. Tokens
appended after compression (the question, decoding) go to a dense tail ``(batch, kv_heads, n, head_dim)``
kept in a buffer that grows by doubling, so a decoding step writes one token in place instead of
copying the layer.

Attention over such a layer is exact: the compressed prefix and the dense tail are two partial
softmaxes, each with its log-sum-exp, combined as

    lse = logaddexp(lse_prefix, lse_tail)
    out = out_prefix * exp(lse_prefix - lse) + out_tail * exp(lse_tail - lse)

The tail is ordinary attention under the model's own mask (causal and padding), which transformers
builds for the appended tokens only (see :mod:`zigzag.cache.attention`). Two backends compute the
attention, chosen by the ``"varlen"`` switch of :mod:`zigzag.kernels` (``set_backend("varlen", ...)``
or ``ZIGZAG_VARLEN_BACKEND``; ``"segment"`` still names ``"torch"``):

* ``"triton"`` (what ``"auto"`` picks on CUDA): one Triton kernel (:mod:`zigzag.kernels.varlen_triton`),
  split-KV partial softmaxes over every segment's slots and the tail, merged by log-sum-exp in the
  same launch. Reads the query, tail and mask in place, no host sync, one launch per layer whatever
  the number of heads.
* ``"torch"`` (elsewhere): :func:`segment_attention`, plain PyTorch on the flat layout, one segment
  softmax over all slots at once (a masked dense product, or ``index_reduce`` / ``index_add``), no
  padding and no Python loop over heads. Exact, and the reference the kernel is tested against, but
  it makes float32 copies of the prefix at every step: slow for decoding.

Under the model's own attention code the layer returns its tail keys as :class:`VarlenKeys`, a tensor
subclass that, like :class:`~zigzag.cache.attention.RaggedKeys`, intercepts SDPA and eager's
``matmul -> scale -> + mask -> softmax -> matmul`` through ``__torch_function__`` and adds the prefix
there. Nothing is patched.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from zigzag.cache.attention import (
    ADD_OPS,
    KEY_VIEW_OPS,
    MATMUL_OPS,
    SCALE_OPS,
    appended_mask,
    plain,
)
from zigzag.cache.decoding import note_queries
from zigzag.cache.layer import CompressedLayerBase
from zigzag.kernels.switch import kernel_switch

_SWITCH = kernel_switch("varlen")
"""The ``"varlen"`` kernel switch: :mod:`zigzag.kernels.varlen_triton` or :func:`segment_attention`."""


# Memo (host_overhead --memos, CPU): 0.04 us a call against 0.25-0.70 for the import; also the seam --compare swaps.
@functools.cache
def _triton_kernels():
    """:mod:`zigzag.kernels.varlen_triton`, imported on first use (it imports triton)."""
    from zigzag.kernels import varlen_triton as varlen_kernel

    return varlen_kernel


def get_backend(device: torch.device) -> str:
    """What a varlen layer on ``device`` runs as the ``"varlen"`` switch stands: ``"triton"`` (the
    kernel) or ``"torch"`` (:func:`segment_attention`)."""
    return "triton" if _SWITCH.use_kernel(device, True) else "torch"


# ---------------------------------------------------------------------------------------------- math


def _tail_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` over the appended tokens, with its log-sum-exp, in float32.

    Args:
        query: ``(batch, Hq, rows, d)``.
        keys, values: ``(batch, kh, n, d)`` with ``Hq % kh == 0`` (GQA groups are consecutive heads).
        mask: ``(batch or 1, 1 or Hq, rows or 1, n)`` bool (True = attend) or additive float; None: all
            visible when ``causal`` is False or ``rows == 1``, else causal aligned to the end.

    Returns:
        ``out (batch, Hq, rows, d)`` float32 and ``lse (batch, Hq, rows)`` float32.
    """
    b, hq, rows, d = query.shape
    kh, n = keys.shape[1], keys.shape[2]
    g = hq // kh
    # GQA without repeating the keys: the g query heads of a key head become a leading group axis.
    q5 = query.float().reshape(b, kh, g, rows, d)
    scores = (q5 @ keys.float()[:, :, None].transpose(-1, -2)) * scale  # (b, kh, g, rows, n)
    if mask is None:
        if causal and rows > 1:
            i = torch.arange(rows, device=query.device)[:, None]
            j = torch.arange(n, device=query.device)[None, :]
            scores = scores.masked_fill(j > i + (n - rows), float("-inf"))
    else:
        m5 = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], kh, g, *mask.shape[2:])
        if m5.dtype == torch.bool:
            scores = scores.masked_fill(~m5, float("-inf"))
        else:
            scores = scores + m5.float()
    lse = scores.logsumexp(dim=-1)  # (b, kh, g, rows)
    # A row that sees no appended token (a padded query at the start of a continuation) has lse = -inf:
    # its share is empty (out = 0), not the NaN of exp(-inf - -inf), which the combine would spread.
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    out = probs @ values.float()[:, :, None]  # (b, kh, g, rows, d)
    return out.reshape(b, hq, rows, d), lse.reshape(b, hq, rows)


def _combine(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Exact softmax over the union of two disjoint key sets from their partial results.

    ``out_*`` ``(..., d)`` float32 and ``lse_*`` ``(...)``; an empty set has ``lse = -inf`` and
    ``out = 0``. At least one of the two must be non-empty for every row."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]


def segment_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each segment's queries over its own slots of the flat layout, in plain PyTorch.

    Args:
        queries: ``(Z, m, d)``: the ``m`` query rows of segment ``z`` (a row's GQA group, all query
            positions).
        keys, values: ``(total, d)`` flat layout.
        offsets: ``(Z + 1,)`` long, segment ``z`` is ``offsets[z]:offsets[z + 1]``.
        bias: ``(total,)`` float added to each slot's logit, or None.

    Returns:
        ``out (Z, m, d)`` float32 (0 for an empty segment) and ``lse (Z, m)`` float32 (``-inf`` there).
    """
    z_count, m, d = queries.shape
    total = keys.shape[0]
    lengths = offsets[1:] - offsets[:-1]
    # Segment of every slot; output_size avoids a device sync.
    seg = torch.repeat_interleave(torch.arange(z_count, device=keys.device), lengths, output_size=total)
    if z_count <= d:
        return _segment_attention_masked(queries, keys, values, seg, bias, scale=scale)
    q = queries.float()
    scores = torch.einsum("sd,smd->sm", keys.float(), q[seg]) * scale  # (total, m)
    if bias is not None:
        scores = scores + bias.float()[:, None]
    peak = torch.full((z_count, m), float("-inf"), device=keys.device)
    peak = peak.scatter_reduce_(0, seg[:, None].expand(-1, m), scores, "amax")
    weights = torch.exp(scores - peak[seg])  # (total, m)
    norm = torch.zeros(z_count, m, device=keys.device).index_add_(0, seg, weights)
    acc = torch.zeros(z_count, m, d, device=keys.device).index_add_(0, seg, weights[..., None] * values.float()[:, None, :])
    empty = norm == 0
    out = acc / norm.masked_fill(empty, 1.0)[..., None]
    lse = torch.where(empty, float("-inf"), peak + norm.masked_fill(empty, 1.0).log())
    return out, lse


def _segment_attention_masked(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    seg: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segment_attention` as one dense product of all query rows with all slots, masked to each
    row's own segment.

    It does ``Z`` times the arithmetic of the segments alone, but reads every slot once and holds a
    ``(Z * m, total)`` score matrix instead of copying each segment's queries onto each of its slots
    (``(total, m, d)``): the cheaper of the two whenever ``Z <= head_dim``, as at small batch.
    ``seg``: ``(total,)`` long, the segment of every slot.
    """
    z_count, m, d = queries.shape
    q = queries.float().reshape(z_count * m, d)
    scores = (q @ keys.float().T) * scale  # (Z * m, total)
    if bias is not None:
        scores = scores + bias.float()[None, :]
    row_segment = torch.arange(z_count, device=keys.device).repeat_interleave(m)  # (Z * m,)
    scores = scores.masked_fill(seg[None, :] != row_segment[:, None], float("-inf"))
    lse = scores.logsumexp(dim=-1)  # -inf for an empty segment
    empty = torch.isinf(lse)
    probs = torch.exp(scores - torch.where(empty, 0.0, lse)[:, None])  # exactly 0 off the segment
    out = probs @ values.float()
    return out.reshape(z_count, m, d), lse.reshape(z_count, m)


def _varlen_attention(
    query: torch.Tensor,
    prefix: tuple,
    tail_keys: torch.Tensor | None,
    tail_values: torch.Tensor | None,
    tail_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix attention of ``query (batch, Hq, rows, d)``, combined with the tail when one is given.

    ``prefix`` is :func:`segment_attention`'s ``(keys, values, offsets, bias)``. Returns
    ``out (batch, Hq, rows, d)`` float32 and ``lse (batch, Hq, rows)`` float32 (``lse`` of the prefix
    alone when there is no tail).
    """
    b, hq, rows, d = query.shape
    g = hq // kv_heads
    # A segment's query rows: the g consecutive query heads of its KV head, every position.
    queries = query.reshape(b * kv_heads, g * rows, d)
    out, lse = segment_attention(queries, *prefix, scale=scale)
    out, lse = out.reshape(b, hq, rows, d), lse.reshape(b, hq, rows)
    if tail_keys is None:
        return out, lse
    out_t, lse_t = _tail_attention(query, tail_keys, tail_values, tail_mask, scale, causal)
    return _combine(out, lse, out_t, lse_t), lse


# ---------------------------------------------------------------------------------------------- layer


class VarlenLayer(CompressedLayerBase):
    """One layer's compressed prefix in the flat varlen layout, followed by a dense tail.

    Args:
        keys: ``(total, head_dim)`` kept keys (post-RoPE), segment after segment (row-major over
            ``(batch, kv_heads)``), ascending positions inside a segment.
        values: ``(total, head_dim)`` kept (or merged) values, same order.
        positions: ``(total,)`` integer, the ``input_ids`` column of each slot.
        head_lengths: ``(batch, kv_heads)`` long, slots of each segment (sums to ``total``).
        original_length: the uncompressed length (columns of ``input_ids``, padding included).
        prefix_bias: ``(total,)`` float added to each slot's attention logit (``log(count)`` of merged
            survivors), or None.

    ``keys`` / ``values`` (the attributes) hold the appended tokens only, ``(batch, kv_heads, n, head_dim)``;
    the prefix is in ``prefix_keys`` / ``prefix_values``. :attr:`kept_positions` rebuilds the dense
    ``(batch, kv_heads, widest)`` index on each access (it is not stored).
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        head_lengths: torch.Tensor,
        original_length: int,
        prefix_bias: torch.Tensor | None = None,
    ) -> None:
        total, head_dim = keys.shape
        if values.shape != keys.shape or positions.shape != (total,) or head_lengths.dim() != 2:
            raise ValueError(
                f"keys {tuple(keys.shape)}, values {tuple(values.shape)}, positions {tuple(positions.shape)} and "
                f"head_lengths {tuple(head_lengths.shape)} must be (total, d), (total, d), (total,), (batch, kv_heads)"
            )
        if prefix_bias is not None and prefix_bias.shape != (total,):
            raise ValueError(f"prefix_bias must be (total,) = ({total},); got {tuple(prefix_bias.shape)}")
        super().__init__(original_length, keys.dtype, keys.device)
        self.batch, self.kv_heads = head_lengths.shape
        self.head_dim = head_dim
        self.prefix_keys, self.prefix_values = keys.contiguous(), values.contiguous()
        self.positions = positions.to(device=keys.device, dtype=torch.int32)
        self.prefix_bias = None if prefix_bias is None else prefix_bias.to(device=keys.device, dtype=torch.float32)
        self._set_index(head_lengths.to(device=keys.device, dtype=torch.long))
        # The dense tail: a buffer of `capacity` slots of which the first `appended` are used.
        self._tail_keys = keys.new_empty(self.batch, self.kv_heads, 0, head_dim)
        self._tail_values = keys.new_empty(self.batch, self.kv_heads, 0, head_dim)
        self._appended = 0
        self._expose_tail()
        # get_backend() as of the backend setting it was resolved for (see _resolved_backend).
        self._backend_setting: str | None = None
        self._backend_resolved = ""

    def _set_index(self, head_lengths: torch.Tensor) -> None:
        if int(head_lengths.sum()) != self.prefix_keys.shape[0]:
            raise ValueError(f"head_lengths sum to {int(head_lengths.sum())}, not to the {self.prefix_keys.shape[0]} slots")
        self.head_lengths = head_lengths
        self.offsets = torch.cat([head_lengths.new_zeros(1), head_lengths.flatten().cumsum(0)])
        self.width = int(head_lengths.max()) if head_lengths.numel() else 0  # one sync, at build time
        self._kernel_prefix = None  # the Triton kernel's view of the prefix (varlen_kernel.Prefix), on first use

    # ------------------------------------------------------------------------------------------ backend

    def _resolved_backend(self) -> str:
        """:func:`get_backend` for this layer's device, resolved again only when the setting changes."""
        # Memo (host_overhead --memos, CPU): 0.05 us against 1.6-2.7 for get_backend, of a 35-60 us layer step.
        setting = _SWITCH.name
        if self._backend_setting is not setting:
            self._backend_resolved = get_backend(self.device)
            self._backend_setting = setting
        return self._backend_resolved

    def _triton_prefix(self):
        """The prefix as the Triton kernel takes it (:class:`zigzag.kernels.varlen_triton.Prefix`), built on first
        use and kept until the index or the prefix tensors change."""
        # Memo (host_overhead --memos, CPU): 0.15 us against 5.7-9.5 for build_prefix, of a 35-60 us layer step.
        kept = self._kernel_prefix
        if (
            kept is None
            or kept.keys is not self.prefix_keys
            or kept.values is not self.prefix_values
            or kept.offsets is not self.offsets
            or kept.bias is not self.prefix_bias
        ):
            kept = self._kernel_prefix = _triton_kernels().build_prefix(
                self.prefix_keys, self.prefix_values, self.offsets, self.prefix_bias,
                kv_heads=self.kv_heads, width=self.width,
            )  # fmt: skip
        return kept

    def attend_prefix(self, query: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``query (batch, Hq, rows, d)`` over the compressed prefix: ``out`` and ``lse``, float32."""
        backend = self._resolved_backend()
        if backend == "triton":
            return _triton_kernels().attend(self._triton_prefix(), query, scale, torch.float32)
        args = (self.prefix_keys, self.prefix_values, self.offsets, self.prefix_bias)
        return _varlen_attention(query, args, None, None, None, scale, False, self.kv_heads)

    def attend(
        self, query: torch.Tensor, tail_keys: torch.Tensor, tail_values: torch.Tensor, tail_mask, scale: float, causal: bool
    ) -> torch.Tensor:
        """Exact attention of ``query (batch, Hq, rows, d)`` over prefix and tail, in the query's dtype."""
        backend = self._resolved_backend()
        if backend == "triton":
            return _triton_kernels().attend(
                self._triton_prefix(), query, scale, query.dtype, tail_keys, tail_values, tail_mask, causal, False
            )[0]
        args = (self.prefix_keys, self.prefix_values, self.offsets, self.prefix_bias)
        out, _ = _varlen_attention(query, args, tail_keys, tail_values, tail_mask, scale, causal, self.kv_heads)
        return out.to(query.dtype)

    @property
    def kept_positions(self) -> torch.Tensor:
        """``(batch, kv_heads, widest)`` long, rebuilt from the flat index on each access.

        Same meaning as :attr:`CompressedLayer.kept_positions`: ``input_ids`` columns kept,
        ascending; ``-1`` marks an empty slot, and empty slots come first."""
        z_count = self.batch * self.kv_heads
        total = self.prefix_keys.shape[0]
        lengths = self.head_lengths.flatten()
        seg = torch.repeat_interleave(torch.arange(z_count, device=self.device), lengths, output_size=total)
        rank = torch.arange(total, device=self.device) - self.offsets[seg]
        column = self.width - lengths[seg] + rank  # right-aligned: the empty slots come first
        out = torch.full((z_count * self.width,), -1, dtype=torch.long, device=self.device)
        out[seg * self.width + column] = self.positions.long()
        return out.view(self.batch, self.kv_heads, self.width)

    # ------------------------------------------------------------------------------------------ cache API

    @property
    def prefix_length(self) -> int:
        """Slots of the widest segment (what a dense layer would store per head)."""
        return self.width

    @property
    def appended(self) -> int:
        """Tokens appended after compression."""
        return self._appended

    def _expose_tail(self) -> None:
        n = self._appended
        self.keys = self._tail_keys.narrow(2, 0, n)
        self.values = self._tail_values.narrow(2, 0, n)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(batch, kv_heads, new, head_dim)``; return the tail keys (as VarlenKeys) and values."""
        if key_states.shape[-2] > 1:  # a decoding step is never checked (a device sync)
            self._check_new_positions(key_states.shape[-2], kwargs)
        n = self._appended
        end = n + key_states.shape[-2]
        tail_k, tail_v = self._tail_keys, self._tail_values
        if end > tail_k.shape[-2]:  # grow by doubling: amortised O(1) copies per decoded token
            capacity = max(2 * tail_k.shape[-2], end, 64)
            grown_k = key_states.new_empty(self.batch, self.kv_heads, capacity, self.head_dim)
            grown_v = value_states.new_empty(self.batch, self.kv_heads, capacity, self.head_dim)
            grown_k[:, :, :n] = tail_k[:, :, :n]
            grown_v[:, :, :n] = tail_v[:, :, :n]
            self._tail_keys, self._tail_values = tail_k, tail_v = grown_k, grown_v
        # The used part, then the new tokens written through it (one view less than narrowing twice).
        self.keys = keys = tail_k.narrow(2, 0, end)
        self.values = values = tail_v.narrow(2, 0, end)
        keys[:, :, n:] = key_states
        values[:, :, n:] = value_states
        self._appended = end
        return VarlenKeys.wrap(keys, self), values

    def _drop_appended(self, count: int) -> None:
        self._appended -= count  # the buffer keeps its capacity: the next tokens overwrite these
        self._expose_tail()

    def _select_rows(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) batch rows ``rows (new_batch,)`` long, in that order."""
        rows = rows.to(self.device).long()
        heads = torch.arange(self.kv_heads, device=self.device)
        src = (rows[:, None] * self.kv_heads + heads).flatten()  # old segment of each new segment
        lengths = self.head_lengths.flatten()[src]
        total = int(lengths.sum())
        seg = torch.repeat_interleave(torch.arange(len(src), device=self.device), lengths, output_size=total)
        new_offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        slot = self.offsets[src][seg] + torch.arange(total, device=self.device) - new_offsets[seg]
        self.prefix_keys = self.prefix_keys[slot]
        self.prefix_values = self.prefix_values[slot]
        self.positions = self.positions[slot]
        if self.prefix_bias is not None:
            self.prefix_bias = self.prefix_bias[slot]
        self.batch = len(rows)
        self._tail_keys = self._tail_keys[rows]
        self._tail_values = self._tail_values[rows]
        self._set_index(lengths.view(self.batch, self.kv_heads))
        self._expose_tail()

    def index_nbytes(self) -> int:
        """Bytes of the slot index: positions (4 per slot), offsets and head lengths."""
        return self.positions.nbytes + self.offsets.nbytes + self.head_lengths.nbytes

    def nbytes(self) -> int:
        """Bytes held: prefix keys and values, the index, the merge bias and the tail buffer (capacity)."""
        bias = 0 if self.prefix_bias is None else self.prefix_bias.nbytes
        tail = self._tail_keys.nbytes + self._tail_values.nbytes
        return self.prefix_keys.nbytes + self.prefix_values.nbytes + self.index_nbytes() + bias + tail

    @classmethod
    def from_full(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        kept: torch.Tensor,
        *,
        merged_values: torch.Tensor | None = None,
        prefix_bias: torch.Tensor | None = None,
    ) -> VarlenLayer:
        """Gather the kept slots of a full cache straight into the flat layout (no padded copy).

        Args:
            keys, values: ``(batch, kv_heads, seq, head_dim)`` one layer's uncompressed cache.
            kept: ``(batch, kv_heads, width)`` long from :func:`zigzag.pipeline.select.select_tokens` (-1 = empty).
            merged_values: ``(batch, kv_heads, width, head_dim)`` values to store instead of the kept
                ones (merge-on-evict), or None.
            prefix_bias: ``(batch, kv_heads, width)`` float per slot, or None.
        """
        batch, kv_heads, _width = kept.shape
        seq, d = keys.shape[2], keys.shape[3]
        real = kept >= 0
        positions = kept[real]  # row-major: segment after segment, ascending inside each
        segment = torch.arange(batch * kv_heads, device=kept.device).view(batch, kv_heads, 1).expand_as(kept)[real]
        index = segment * seq + positions
        flat_k = keys.reshape(-1, d).index_select(0, index)
        flat_v = values.reshape(-1, d).index_select(0, index) if merged_values is None else merged_values[real]
        bias = None if prefix_bias is None else prefix_bias[real]
        return cls(flat_k, flat_v, positions, real.sum(-1), seq, bias)

    @classmethod
    def from_padded(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        kept: torch.Tensor,
        original_length: int,
        prefix_bias: torch.Tensor | None = None,
    ) -> VarlenLayer:
        """The varlen copy of a dense layer's ``(batch, kv_heads, width, head_dim)`` slots.

        ``kept (batch, kv_heads, width)`` marks empty slots with -1; they are dropped."""
        real = kept >= 0
        bias = None if prefix_bias is None else prefix_bias[real]
        return cls(keys[real], values[real], kept[real], real.sum(-1), original_length, bias)


def heads_differ(kept: torch.Tensor) -> bool:
    """True when some row of ``kept (batch, kv_heads, width)`` keeps different counts in different heads."""
    counts = (kept >= 0).sum(-1)
    return kept.shape[1] > 1 and bool((counts != counts[:, :1]).any())


# ---------------------------------------------------------------------------------------------- interception


def _varlen_arg(args):
    for a in args:
        if isinstance(a, (VarlenKeys, _VarlenScores, _VarlenProbs)):
            return a
        if isinstance(a, (list, tuple)):
            found = _varlen_arg(a)
            if found is not None:
                return found
    return None


def _tail_of(mask: torch.Tensor | None, n_tail: int, layer: VarlenLayer | None = None) -> torch.Tensor | None:
    """:func:`~zigzag.cache.attention.appended_mask` of ``mask``, or None without one."""
    return None if mask is None else appended_mask(mask, n_tail, layer)


_last_tail_mask: tuple = (None, None)
_MASK_KEPT = 1 << 22
"""Largest mask (elements) that :func:`_sdpa_tail_mask` keeps a reference to until the next call."""


def _sdpa_tail_mask(mask: torch.Tensor, n_tail: int, layer: VarlenLayer | None = None) -> torch.Tensor:
    """:func:`_tail_of` for SDPA, which every layer calls with the same mask object in a forward pass:
    the last view made is kept and given again for that object (the kept reference stops its id from
    being reused; the view shares its memory, so it stays right if the mask is written in place).
    Decoding masks are small; a larger one is not kept, so that its memory is freed with the pass."""
    global _last_tail_mask
    # Memo (host_overhead --memos, CPU): 0.2-0.4 us against 3.4-5.7 for _tail_of, per layer of a masked step.
    last = _last_tail_mask
    if last[0] is mask and last[1].shape[-1] == n_tail:
        return last[1]
    tail = _tail_of(plain(mask), n_tail, layer)
    _last_tail_mask = (mask, tail) if mask.numel() <= _MASK_KEPT else (None, None)
    return tail


def _varlen_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kwargs):
    if dropout_p:
        raise NotImplementedError("attention dropout is not supported on a compressed cache (use model.eval())")
    if type(query) is not torch.Tensor:
        query = plain(query)
    if type(value) is not torch.Tensor:
        value = plain(value)
    keys = key._tensor
    note_queries(key._varlen, query)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    mask = None if attn_mask is None else _sdpa_tail_mask(attn_mask, keys.shape[-2], key._varlen)
    return key._varlen.attend(query, keys, value, mask, scale, bool(is_causal))


_SDPA = torch._C._nn.scaled_dot_product_attention  # what F.scaled_dot_product_attention is, even if wrapped later
_without_subclasses = torch._C._disabled_torch_function_impl  # func(*args, **kwargs) as plain tensors
_NO_KWARGS: dict = {}


class VarlenKeys(torch.Tensor):
    """The appended keys of a :class:`VarlenLayer`, ``(batch, kv_heads, appended, head_dim)``, which
    know their layer (``_varlen``) so that attention can add the compressed prefix, and the same keys
    as a plain tensor (``_tensor``), for the kernels."""

    _varlen: VarlenLayer
    _tensor: torch.Tensor

    @staticmethod
    def wrap(keys: torch.Tensor, layer: VarlenLayer) -> VarlenKeys:
        out = keys.as_subclass(VarlenKeys)
        out._varlen = layer
        # An op that returns its input (contiguous() of contiguous keys) hands back the subclass itself.
        out._tensor = keys if type(keys) is torch.Tensor else keys.as_subclass(torch.Tensor)
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Called for every op and attribute read on the keys (shape, stride, ...): the common cases first.
        if func is _SDPA:
            return _varlen_sdpa(*args, **(kwargs or _NO_KWARGS))
        out = _without_subclasses(func, types, args, kwargs or _NO_KWARGS)
        if func in KEY_VIEW_OPS:
            if isinstance(out, torch.Tensor):
                return VarlenKeys.wrap(out, _varlen_arg(args)._varlen)
        elif func in MATMUL_OPS and isinstance(args[1], VarlenKeys):
            note_queries(args[1]._varlen, plain(args[0]))
            return _VarlenScores.wrap(out, args[1]._varlen, plain(args[0]), 1.0, None)
        return out


class _VarlenScores(torch.Tensor):
    """Eager logits over the tail ``(batch, heads, q, appended)``, waiting for scale, mask and softmax.

    ``_query`` is the query that made them and ``_scale`` the factor applied since, so that the
    prefix logits (never materialized) get the same treatment."""

    _varlen: VarlenLayer
    _query: torch.Tensor
    _scale: float
    _mask: torch.Tensor | None

    @staticmethod
    def wrap(scores, layer, query, scale, mask) -> _VarlenScores:
        out = scores.as_subclass(_VarlenScores)
        out._varlen, out._query, out._scale, out._mask = layer, query, scale, mask
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        me = next(a for a in args if isinstance(a, _VarlenScores))
        scores = plain(me)
        others = [a for a in args if a is not me]
        if func in SCALE_OPS and len(others) == 1 and not (isinstance(others[0], torch.Tensor) and others[0].dim() > 0):
            factor = float(others[0])
            if func in (torch.Tensor.__truediv__, torch.Tensor.div, torch.div):
                factor = 1.0 / factor
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return _VarlenScores.wrap(out, me._varlen, me._query, me._scale * factor, me._mask)
        if func in ADD_OPS and me._mask is None and len(others) == 1 and isinstance(others[0], torch.Tensor):
            mask = _tail_of(plain(others[0]), scores.shape[-1], me._varlen)
            mask = mask if mask.dtype != torch.bool else torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
            return _VarlenScores.wrap(scores + mask.to(scores.dtype), me._varlen, me._query, me._scale, mask)
        if func in (F.softmax, torch.softmax, torch.Tensor.softmax):
            return me._softmax(kwargs.get("dtype"))
        raise NotImplementedError(
            f"{getattr(func, '__name__', func)} on the attention logits of a varlen compressed layer: only "
            "scaling, adding the mask and softmax (the stock eager attention) are supported"
        )

    def _softmax(self, dtype) -> _VarlenProbs:
        scores = plain(self).float()
        if self._mask is None:  # the model added no mask: causal over the tail, aligned to the end
            rows, n = scores.shape[-2:]
            if rows > 1:
                i = torch.arange(rows, device=scores.device)[:, None]
                j = torch.arange(n, device=scores.device)[None, :]
                scores = scores.masked_fill(j > i + (n - rows), float("-inf"))
        out_p, lse_p = self._varlen.attend_prefix(self._query, self._scale)
        lse = torch.logaddexp(lse_p, scores.logsumexp(-1))  # (b, H, rows)
        probs = torch.exp(scores - lse[..., None])
        prefix_out = out_p * torch.exp(lse_p - lse)[..., None]
        probs = probs if dtype is None else probs.to(dtype)
        return _VarlenProbs.wrap(probs, prefix_out)


class _VarlenProbs(torch.Tensor):
    """Eager attention probabilities over the tail; ``_prefix_out`` ``(batch, heads, q, d)`` float32
    is the prefix's share of the output, already weighted, added at ``probs @ values``."""

    _prefix_out: torch.Tensor

    @staticmethod
    def wrap(probs, prefix_out) -> _VarlenProbs:
        out = probs.as_subclass(_VarlenProbs)
        out._prefix_out = prefix_out
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        me = next(a for a in args if isinstance(a, _VarlenProbs))
        if func in MATMUL_OPS and args[0] is me:
            out = plain(me) @ plain(args[1])
            return out + me._prefix_out.to(out.dtype)
        if func is F.dropout:
            if kwargs.get("training", args[2] if len(args) > 2 else True) and (kwargs.get("p", args[1] if len(args) > 1 else 0.5)):
                raise NotImplementedError("attention dropout is not supported on a compressed cache (use model.eval())")
            return me
        if func in (torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.float, torch.Tensor.contiguous):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return _VarlenProbs.wrap(out, me._prefix_out)
        raise NotImplementedError(
            f"{getattr(func, '__name__', func)} on the attention probabilities of a varlen compressed layer: "
            "they cover the appended tokens only"
        )


__all__ = [
    "VarlenKeys",
    "VarlenLayer",
    "get_backend",
    "heads_differ",
    "segment_attention",
]
