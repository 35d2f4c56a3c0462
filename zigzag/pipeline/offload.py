"""Layers waiting for their final budget: the best tokens on the accelerator, the rest ranked on the host.

Allocators that need every layer's LMBA before any budget is known (ZigZag) get *provisional*
layers during the prefill: each layer's ``avg_budget`` best tokens stay on the accelerator and all
the others, already ranked by score, go to pinned host memory (asynchronously, on a side stream).
Once the budgets are fixed, layers under the average are trimmed and layers above it fetch their
next best tokens back, so peak accelerator memory is that of uniform budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zigzag.kernels.gather import gather_split


@dataclass
class Provisional:
    """One layer waiting for its final budget (LMBA allocators).

    ``top_*``: the ``width`` best tokens of each (row, head) on the accelerator, best first;
    ``rest_*``: all the others, best first, in host memory, rank-major so that fetching the next
    best ``n`` is one contiguous copy. Positions are ``input_ids`` columns.
    """

    top_positions: torch.Tensor  # (batch, kv_heads, width) long
    top_keys: torch.Tensor  # (batch, kv_heads, width, head_dim)
    top_values: torch.Tensor
    rest_positions: torch.Tensor  # (seq - width, batch, kv_heads) long, host
    rest_keys: torch.Tensor  # (seq - width, batch, kv_heads, head_dim), host
    rest_values: torch.Tensor

    @classmethod
    def park(cls, keys: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, ranked: torch.Tensor, width: int) -> Provisional:
        """Keep the ``width`` best of ``ranked`` on the device and start copying the rest to the host.

        Args:
            keys, values: ``(batch, kv_heads, slots, head_dim)`` the layer's slots.
            columns: ``(batch, kv_heads, slots)`` long ``input_ids`` column of each ranked entry.
            ranked: ``(batch, kv_heads, slots)`` long slot indices, best first.
            width: slots kept on the device (the largest average budget over rows).
        """
        top_keys, top_values, rest_keys, rest_values = gather_split(keys, values, ranked, width)
        return cls(
            top_positions=columns[..., :width],
            top_keys=top_keys,
            top_values=top_values,
            rest_positions=to_host(columns[..., width:].permute(2, 0, 1).contiguous()),
            rest_keys=to_host(rest_keys),
            rest_values=to_host(rest_values),
        )

    def best_positions(self, count: int, device: torch.device) -> torch.Tensor:
        """The ``count`` best positions of each (row, head), best first: ``(batch, kv_heads, count)``."""
        more = count - self.top_positions.shape[-1]
        if more <= 0:
            return self.top_positions[..., :count]
        fetched = self.rest_positions[:more].to(device, non_blocking=True).movedim(0, -1)
        return torch.cat([self.top_positions, fetched], dim=-1)

    def best_states(self, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the ``count`` best tokens, best first: ``(batch, kv_heads, count, head_dim)``."""
        more = count - self.top_positions.shape[-1]
        if more <= 0:
            return self.top_keys[..., :count, :], self.top_values[..., :count, :]
        fetched = self.fetched_states(more, device)
        return tuple(torch.cat([top, rest.movedim(0, -2)], dim=-2) for top, rest in zip((self.top_keys, self.top_values), fetched))

    def fetched_states(self, more: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the next ``more`` best tokens after the top, rank-major as stored:
        ``(more, batch, kv_heads, head_dim)`` on ``device`` (one contiguous copy each)."""
        return self.rest_keys[:more].to(device, non_blocking=True), self.rest_values[:more].to(device, non_blocking=True)

    def best(self, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``count`` best positions, keys and values of each (row, head), best first."""
        return self.best_positions(count, device), *self.best_states(count, device)

    def full(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All positions best first, and the uncompressed ``(batch, kv_heads, seq, head_dim)`` keys and
        values in column order again (merging needs every evicted token)."""
        seq = self.top_positions.shape[-1] + self.rest_positions.shape[0]
        ranked, keys, values = self.best(seq, device)
        order = ranked.argsort(dim=-1)[..., None].expand_as(keys)
        return ranked, keys.gather(2, order), values.gather(2, order)


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying ``t`` to pinned host memory on a side stream, so the next layers' compute overlaps
    the transfer; :func:`host_ready` must run before the copy is read."""
    if t.device.type != "cuda":
        return t
    stream = _COPY_STREAMS.setdefault(t.device, torch.cuda.Stream(t.device))
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)  # keep t's memory from being reused before the copy has read it
    return host


def host_ready(device: torch.device) -> None:
    if device.type == "cuda" and device in _COPY_STREAMS:
        torch.cuda.current_stream(device).wait_stream(_COPY_STREAMS[device])
