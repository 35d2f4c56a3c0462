"""Layers waiting for their final budget: the best tokens on the accelerator, the rest ranked on the host.

Allocators that need every layer's LMBA before any budget is known (ZigZag) get *provisional*
layers during the prefill: each layer's ``avg_budget`` best tokens stay on the accelerator and all
the others, already ranked by score, go to pinned host memory (asynchronously, on a side stream).
Once the budgets are fixed, layers under the average are trimmed and layers above it fetch their
next best tokens back, so peak accelerator memory is that of uniform budgets.

The host memory comes from a :class:`HostArena` per device: a pool of pinned blocks that only grows,
from which each compression carves its host tensors (:class:`HostLease`) and to which it gives them
back once settled. Pinning is slow (a driver call that can stall every stream of the process, and
worse with many processes on one GPU), so a compression of about the same length as an earlier one
pins nothing. A block is reused only after everything that read or wrote it has run: the lease's
release records a fence on the stream that read it, and the next copies into the block wait for it
on the accelerator (:class:`HostParking`), so the host never waits.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from zigzag.kernels.gather import gather_split

ALIGNMENT = 256
"""Bytes every carving starts on: a multiple of every dtype's size and of what copy engines like best."""

HEADROOM = 1.5
"""A new block holds this many times the bytes asked for, so that later compressions up to 1.5x as
long (lengths varying by ±15% around the first, say) fit without pinning again."""

Allocate = Callable[[int], torch.Tensor]
"""Returns ``(nbytes,)`` contiguous uint8 host memory (pinned, for asynchronous copies)."""


def pinned_bytes(nbytes: int) -> torch.Tensor:
    """``(nbytes,)`` uint8 in page-locked host memory. Freed, it goes back to torch's pinned allocator,
    which keeps a block from reuse until the copies recorded on it have run."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def aligned(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment``."""
    return -(-nbytes // alignment) * alignment


@dataclass(eq=False)
class HostBlock:
    """One allocation of an arena. ``fence``: what the last lease that held it recorded at its release
    (None for a new block); copies into the block must wait for it before they write."""

    data: torch.Tensor  # (capacity,) uint8
    fence: object | None = None

    @property
    def capacity(self) -> int:
        return self.data.numel()


class HostArena:
    """A grow-only pool of host blocks that compressions carve their parked tensors from.

    :meth:`lease` hands one compression the largest free block (or none); the lease grows it when
    asked for more (:meth:`HostLease.reserve`, or a carving that does not fit) and gives its largest
    block back at :meth:`HostLease.release`, fenced, dropping the smaller ones, so the pool never
    shrinks and settles at one block per compression running at a time. Pure bookkeeping: what the
    memory is (``allocate``) and what a fence is are the caller's, so it runs on the CPU too.

    Attributes:
        allocations, allocated_bytes: blocks and bytes asked of ``allocate`` so far.
    """

    def __init__(self, allocate: Allocate = pinned_bytes, *, headroom: float = HEADROOM, alignment: int = ALIGNMENT):
        if headroom < 1.0:
            raise ValueError(f"headroom must be at least 1; got {headroom}")
        self.allocate, self.headroom, self.alignment = allocate, headroom, alignment
        self.allocations = 0
        self.allocated_bytes = 0
        self._free: list[HostBlock] = []
        self._lock = threading.Lock()  # two threads may compress on one device at once

    @property
    def free_blocks(self) -> list[HostBlock]:
        """The blocks no lease holds now (a copy of the list)."""
        with self._lock:
            return list(self._free)

    def lease(self) -> HostLease:
        """A lease for one compression, holding the largest free block if there is one."""
        with self._lock:
            block = max(self._free, key=lambda b: b.capacity, default=None)
            if block is not None:
                self._free.remove(block)
        return HostLease(self, block)

    def new_block(self, nbytes: int, previous: int = 0) -> HostBlock:
        """A fresh block of at least ``headroom * nbytes`` bytes and twice ``previous`` (the block it
        replaces), so that a run of growing requests pins only logarithmically often."""
        capacity = aligned(max(math.ceil(nbytes * self.headroom), 2 * previous, 1), self.alignment)
        data = self.allocate(capacity)
        if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() < capacity or not data.is_contiguous():
            raise ValueError(f"allocate({capacity}) must return a contiguous ({capacity},) uint8 tensor; got {data.dtype} {tuple(data.shape)}")
        self.allocations += 1
        self.allocated_bytes += data.numel()
        return HostBlock(data)

    def give_back(self, blocks: list[HostBlock], fence: object | None) -> None:
        """Put the largest of a settled lease's ``blocks`` back in the pool behind ``fence``; the others
        are dropped (the next lease of the same size fits in the one kept)."""
        if not blocks:
            return
        kept = max(blocks, key=lambda b: b.capacity)
        kept.fence = fence
        with self._lock:
            self._free.append(kept)


class HostLease:
    """One compression's carvings from a :class:`HostArena`: a bump allocator over the blocks it holds.

    Carvings never overlap while the lease is open; after :meth:`release` they may be handed out again,
    so nothing may read or write them once the fence given there has passed.
    """

    def __init__(self, arena: HostArena, block: HostBlock | None):
        self.arena = arena
        self.blocks: list[HostBlock] = [] if block is None else [block]
        self.offset = 0  # bytes carved from the last block
        self.carved = 0  # aligned bytes carved in all
        self.open = True
        self._fences = [] if block is None or block.fence is None else [block.fence]

    def reserve(self, sizes: Iterable[int]) -> None:
        """Make sure carvings of ``sizes`` bytes fit in one block (call before the first carving): a
        held block too small is swapped for a larger one, before anything is carved from it."""
        if self.carved:
            raise RuntimeError("reserve() must come before the first carving")
        need = sum(aligned(n, self.arena.alignment) for n in sizes)
        if self.blocks and self.blocks[-1].capacity >= need:
            return
        previous = self.blocks[-1].capacity if self.blocks else 0
        self.blocks = [self.arena.new_block(need, previous)]  # the small block is dropped unused
        self._fences = []  # a fresh block: nothing to wait for

    def carve(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous ``shape`` tensor of ``dtype`` in the lease's memory, overlapping no other carving."""
        if not self.open:
            raise RuntimeError("carve() after release()")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        size = aligned(nbytes, self.arena.alignment)
        if not self.blocks or self.offset + size > self.blocks[-1].capacity:
            self._overflow(size)
        data = self.blocks[-1].data
        out = data[self.offset : self.offset + nbytes].view(dtype).view(shape)
        self.offset += size
        self.carved += size
        return out

    def _overflow(self, size: int) -> None:
        # More than reserved: one more block, large enough for the whole lease so far, so that the block
        # given back holds all of it next time. What was carved stays where it is (it may be in flight).
        largest = max((b.capacity for b in self.blocks), default=0)
        self.blocks.append(self.arena.new_block(self.carved + size, largest))
        self.offset = 0

    def take_fences(self) -> list[object]:
        """The fences of the blocks this lease got from the pool, once: the first copy into the lease
        must wait for them (the previous lease's reads of the same memory)."""
        fences, self._fences = self._fences, []
        return fences

    def release(self, fence: object | None = None) -> None:
        """Give the blocks back; ``fence`` marks where every copy from or to them was enqueued. Idempotent."""
        if not self.open:
            return
        self.open = False
        self.arena.give_back(self.blocks, fence)
        self.blocks = []


_ARENAS: dict[torch.device, HostArena | None] = {}
_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def host_arena(device: torch.device) -> HostArena | None:
    """The process's arena for layers parked from ``device``: on CUDA one of pinned blocks, made on
    first use; elsewhere None (the layers wait where they are: host memory is the device's own)
    unless :func:`set_host_arena` put one there."""
    device = _indexed(device)
    if device not in _ARENAS and device.type == "cuda":
        _ARENAS[device] = HostArena()
    return _ARENAS.get(device)


def set_host_arena(device: torch.device, arena: HostArena | None) -> None:
    """Use ``arena`` for the layers parked from ``device`` from now on (None: the default). A fresh
    arena pins anew; off CUDA an arena makes the layers park through it (the copies then run at once)."""
    device = _indexed(device)
    if arena is None:
        _ARENAS.pop(device, None)
    else:
        _ARENAS[device] = arena


def _indexed(device: torch.device) -> torch.device:
    """``device`` with its index (``cuda`` and ``cuda:0`` are one device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class HostParking:
    """Where one compression's provisional layers wait in host memory, copied from one device.

    :meth:`to_host` starts each copy, on CUDA on a side stream so that the next layers' compute
    overlaps the transfer; :meth:`ready` must run before the copies are read (on the current stream);
    :meth:`close` once the last read has been enqueued, which returns the memory to the arena.
    """

    def __init__(self, device: torch.device, lease: HostLease):
        self.device = _indexed(device)
        self.lease = lease
        self.stream = _copy_stream(self.device) if self.device.type == "cuda" else None

    @classmethod
    def open(cls, device: torch.device, sizes: Iterable[int]) -> HostParking | None:
        """Parking for copies of ``sizes`` bytes in all from ``device``, or None where ``device`` has no
        arena (:func:`host_arena`)."""
        arena = host_arena(device)
        if arena is None:
            return None
        lease = arena.lease()
        lease.reserve(sizes)
        return cls(device, lease)

    def to_host(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Host copies of ``tensors`` (contiguous, on this device) carved from the lease; on CUDA only
        started, all behind one wait for the work that made them."""
        for t in tensors:
            if t.device != self.device:
                raise ValueError(f"HostParking of {self.device} got a tensor on {t.device}")
        hosts = [self.lease.carve(t.shape, t.dtype) for t in tensors]
        if self.stream is None:
            return [host.copy_(t) for host, t in zip(hosts, tensors)]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for fence in self.lease.take_fences():
            self.stream.wait_event(fence)  # the previous lease's reads of this memory come first
        with torch.cuda.stream(self.stream):
            for host, t in zip(hosts, tensors):
                host.copy_(t, non_blocking=True)
        for t in tensors:
            t.record_stream(self.stream)  # keep t's memory from being reused before the copy has read it
        return hosts

    def ready(self) -> None:
        """Make the current stream wait for every copy started so far (on the accelerator, not the host)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def close(self) -> None:
        """Every read of the parked copies is enqueued (or none will come): fence the current stream,
        which then also waits for the side stream, and give the memory back. Idempotent."""
        if not self.lease.open:
            return
        fence = None
        if self.stream is not None:
            self.ready()
            fence = torch.cuda.Event()
            fence.record(torch.cuda.current_stream(self.device))
        self.lease.release(fence)


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return _COPY_STREAMS.setdefault(device, torch.cuda.Stream(device))


def parked_sizes(keys: torch.Tensor, width: int) -> list[int]:
    """Bytes of the three host tensors :meth:`Provisional.park` copies for one layer whose ``keys``
    are ``(batch, kv_heads, slots, head_dim)``, ``width`` of them kept on the device: positions (long),
    keys and values."""
    batch, kv_heads, slots, head_dim = keys.shape
    rest = max(slots - width, 0) * batch * kv_heads
    return [rest * torch.long.itemsize, rest * head_dim * keys.element_size(), rest * head_dim * keys.element_size()]


@dataclass
class Provisional:
    """One layer waiting for its final budget (LMBA allocators).

    ``top_*``: the ``width`` best tokens of each (row, head) on the accelerator, best first;
    ``rest_*``: all the others, best first, in host memory (on the device off CUDA), rank-major so
    that fetching the next best ``n`` is one contiguous copy. Positions are ``input_ids`` columns.
    """

    top_positions: torch.Tensor  # (batch, kv_heads, width) long
    top_keys: torch.Tensor  # (batch, kv_heads, width, head_dim)
    top_values: torch.Tensor
    rest_positions: torch.Tensor  # (seq - width, batch, kv_heads) long, host
    rest_keys: torch.Tensor  # (seq - width, batch, kv_heads, head_dim), host
    rest_values: torch.Tensor

    @classmethod
    def park(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        columns: torch.Tensor,
        ranked: torch.Tensor,
        width: int,
        host: HostParking | None = None,
    ) -> Provisional:
        """Keep the ``width`` best of ``ranked`` on the device and start copying the rest to the host.

        Args:
            keys, values: ``(batch, kv_heads, slots, head_dim)`` the layer's slots.
            columns: ``(batch, kv_heads, slots)`` long ``input_ids`` column of each ranked entry.
            ranked: ``(batch, kv_heads, slots)`` long slot indices, best first.
            width: slots kept on the device (the largest average budget over rows).
            host: where the rest goes (:class:`HostParking`); None: it stays on the device.
        """
        top_keys, top_values, rest_keys, rest_values = gather_split(keys, values, ranked, width)
        rest = (columns[..., width:].permute(2, 0, 1).contiguous(), rest_keys, rest_values)
        rest_positions, rest_keys, rest_values = rest if host is None else host.to_host(*rest)
        return cls(
            top_positions=columns[..., :width],
            top_keys=top_keys,
            top_values=top_values,
            rest_positions=rest_positions,
            rest_keys=rest_keys,
            rest_values=rest_values,
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
