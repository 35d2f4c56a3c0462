"""The pinned host arena of ZigZag's provisional layers (zigzag/pipeline/offload.py).

Its bookkeeping runs on the CPU with plain memory (the allocation is injected): regions reused across
compressions behind the last one's fence, geometric growth, no overlap between live carvings. The
pipeline parks through an installed arena on the CPU too, and gives the cache of the reference path.
On CUDA (skipped without it) a second compression of the same or a shorter length pins nothing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import tiny_llama
from tests.test_streaming import _assert_same_cache, _batch
from zigzag import compress_cache, prefill_context
from zigzag.merge import CosineMerge
from zigzag.pipeline.offload import ALIGNMENT, HostArena, HostParking, aligned, parked_sizes, set_host_arena
from zigzag.scorers import Scorer


class Counting:
    """An ``allocate`` of plain host memory that records every request."""

    def __init__(self):
        self.requests: list[int] = []

    def __call__(self, nbytes: int) -> torch.Tensor:
        self.requests.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[start, end)`` of a contiguous tensor."""
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _layer_sizes(tokens: int, layers: int = 30) -> list[int]:
    """What a SmolLM2-shaped compression parks: 3 KV heads, head_dim 64, bf16, half the tokens."""
    keys = torch.empty(1, 3, tokens, 64, dtype=torch.bfloat16, device="meta")
    return parked_sizes(keys, tokens // 2) * layers


def _carve_all(lease, sizes: list[int]) -> list[torch.Tensor]:
    return [lease.carve((n,), torch.uint8) for n in sizes]


# ---------------------------------------------------------------------------------------------- bookkeeping


def test_a_second_compression_reuses_the_same_region_behind_the_first_ones_fence():
    allocate = Counting()
    arena = HostArena(allocate)
    sizes = _layer_sizes(4000)
    first = arena.lease()
    first.reserve(sizes)
    assert first.take_fences() == []  # a fresh block: nothing to wait for
    spans = [_span(t) for t in _carve_all(first, sizes)]
    first.release("fence of the first")
    second = arena.lease()
    second.reserve(sizes)
    assert [_span(t) for t in _carve_all(second, sizes)] == spans
    assert second.take_fences() == ["fence of the first"]
    assert second.take_fences() == []  # waited for once
    assert len(allocate.requests) == 1


@pytest.mark.parametrize("tokens", [4000, 3600, 4600, 3500])
def test_lengths_within_fifteen_percent_of_the_first_pin_nothing_new(tokens):
    allocate = Counting()
    arena = HostArena(allocate)
    for length in (4000, tokens, 4000):
        lease = arena.lease()
        lease.reserve(_layer_sizes(length))
        _carve_all(lease, _layer_sizes(length))
        lease.release()
    assert len(allocate.requests) == 1
    assert arena.allocated_bytes == allocate.requests[0] >= 1.5 * sum(_layer_sizes(4000))


def test_growth_is_geometric_and_the_pool_keeps_one_block():
    allocate = Counting()
    arena = HostArena(allocate)
    for need in (1000, 1100, 20000, 20001):
        lease = arena.lease()
        lease.reserve([need])
        lease.carve((need,), torch.uint8)
        lease.release()
        assert len(arena.free_blocks) == 1
    assert len(allocate.requests) == 2  # 1100 and 20001 fit in the blocks that 1000 and 20000 made
    assert allocate.requests[0] == aligned(1500) and allocate.requests[1] == aligned(int(1.5 * aligned(20000)))
    lease = arena.lease()
    lease.reserve([allocate.requests[1] + 1])  # just past the block: twice it, more than the headroom asks
    assert allocate.requests[2] == 2 * allocate.requests[1] == lease.blocks[0].capacity
    assert arena.free_blocks == []  # the small block was dropped, not pooled beside the new one


def test_a_carving_past_the_reservation_leaves_the_earlier_ones_in_place():
    allocate = Counting()
    arena = HostArena(allocate)
    lease = arena.lease()
    lease.reserve([4096])
    early = lease.carve((1024,), torch.int64)  # 8192 bytes: past the reservation, a block of its own
    early.copy_(torch.arange(1024))
    more = [lease.carve((3000,), torch.float32) for _ in range(4)]
    for k, t in enumerate(more):
        t.fill_(k)
    assert torch.equal(early, torch.arange(1024))
    assert all(bool((t == k).all()) for k, t in enumerate(more))
    carved = lease.carved
    lease.release()
    (kept,) = arena.free_blocks
    assert kept.capacity >= carved  # the whole lease fits in the block given back
    again = arena.lease()
    again.reserve([1024 * 8] + [12000] * 4)
    requests = len(allocate.requests)
    again.carve((1024,), torch.int64)
    for _ in range(4):
        again.carve((3000,), torch.float32)
    assert len(allocate.requests) == requests


_DTYPES = [torch.uint8, torch.bfloat16, torch.float32, torch.int64]


@settings(max_examples=60, deadline=None)
@given(
    reserved=st.integers(0, 50_000),
    carvings=st.lists(st.tuples(st.booleans(), st.integers(0, 3000), st.sampled_from(range(len(_DTYPES)))), max_size=40),
)
def test_live_carvings_of_two_leases_never_overlap(reserved, carvings):
    arena = HostArena(Counting())
    warm = arena.lease()  # leave a block in the pool, so that one lease reuses it
    warm.reserve([reserved])
    warm.release("f")
    leases = [arena.lease(), arena.lease()]
    for lease in leases:
        lease.reserve([reserved // 2])
    live: list[tuple[torch.Tensor, int]] = []
    for k, (which, count, dtype) in enumerate(carvings):
        t = leases[which].carve((count, 2), _DTYPES[dtype])
        assert t.is_contiguous() and t.dtype == _DTYPES[dtype] and t.shape == (count, 2)
        if t.numel():
            assert (t.data_ptr() - t.untyped_storage().data_ptr()) % ALIGNMENT == 0  # from its block's start
            t.view(torch.uint8).fill_(k % 251)
            live.append((t, k % 251))
    spans = sorted(_span(t) for t, _ in live)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert all(bool((t.view(torch.uint8) == mark).all()) for t, mark in live)  # nothing overwrote another


def test_leases_open_at_once_get_different_blocks_and_both_are_kept():
    arena = HostArena(Counting())
    a, b = arena.lease(), arena.lease()
    a.reserve([5000])
    b.reserve([5000])
    assert a.blocks[0] is not b.blocks[0]
    a.release("a")
    b.release("b")
    assert sorted(block.fence for block in arena.free_blocks) == ["a", "b"]


def test_misuse_is_refused_and_release_is_idempotent():
    arena = HostArena(Counting())
    lease = arena.lease()
    lease.carve((10,), torch.float32)
    with pytest.raises(RuntimeError, match="before the first carving"):
        lease.reserve([100])
    lease.release("once")
    lease.release("twice")
    assert [block.fence for block in arena.free_blocks] == ["once"]
    with pytest.raises(RuntimeError, match="after release"):
        lease.carve((10,), torch.float32)
    with pytest.raises(ValueError, match="uint8"):
        HostArena(lambda n: torch.empty(n // 4, dtype=torch.float32)).lease().reserve([64])
    with pytest.raises(ValueError, match="headroom"):
        HostArena(Counting(), headroom=0.5)


# ---------------------------------------------------------------------------------------------- the pipeline


@pytest.fixture
def cpu_arena():
    """An arena of plain memory that the CPU pipeline parks through while the test runs."""
    allocate = Counting()
    arena = HostArena(allocate)
    set_host_arena(torch.device("cpu"), arena)
    yield arena, allocate
    set_host_arena(torch.device("cpu"), None)


@pytest.mark.parametrize(("scorer", "budget", "merge"), [
    ("snapkv", "zigzag", None), ("expected_attention", "zigzag+skip2", None), ("knorm", "zigzag", CosineMerge(preserve_mass=True)),
    ("tova", "zigzag_heads", None),
])  # fmt: skip
def test_compress_cache_through_the_arena_equals_the_reference(cpu_arena, scorer, budget, merge):
    arena, allocate = cpu_arena
    model = tiny_llama(layers=4, seed=3)
    first_inputs, second_inputs = _batch(seed=1, vocab=128, lengths=(60, 47)), _batch(seed=2, vocab=128, lengths=(54, 54))
    first = compress_cache(model, first_inputs, 0.6, scorer, budget, merge=merge)
    assert len(allocate.requests) == 1 and len(arena.free_blocks) == 1  # parked through it, and given back
    second = compress_cache(model, second_inputs, 0.6, scorer, budget, merge=merge)  # a shorter one, same memory
    assert len(allocate.requests) == 1
    for inputs, cache in ((first_inputs, first), (second_inputs, second)):  # the first is not touched by the second
        _assert_same_cache(cache, prefill_context(model, inputs, window=64).compress(0.6, scorer, budget, merge=merge))


def test_chunked_prefill_parks_its_last_chunk_through_the_arena(cpu_arena):
    arena, allocate = cpu_arena
    model = tiny_llama(layers=3, seed=4)
    inputs = _batch(seed=5, vocab=128, lengths=(150, 131))
    ours = compress_cache(model, inputs, 0.5, "snapkv", "zigzag", chunk_size=64)
    assert len(allocate.requests) == 1 and len(arena.free_blocks) == 1  # the reservation held every layer
    set_host_arena(torch.device("cpu"), None)  # the reference: layers wait on the device, no arena
    _assert_same_cache(ours, compress_cache(model, inputs, 0.5, "snapkv", "zigzag", chunk_size=64))


@dataclass
class FailsAtLayer(Scorer):
    """Key norms, but raising at one layer: a compression that stops half-way through the prefill."""

    layer: int = 1
    name: ClassVar[str] = "fails"

    def score(self, view):
        if view.layer_idx == self.layer:
            raise RuntimeError("scorer failed")
        return view.keys.float().norm(dim=-1)


def test_a_compression_that_fails_half_way_gives_its_memory_back(cpu_arena):
    arena, allocate = cpu_arena
    model = tiny_llama(layers=3)
    inputs = _batch(seed=6, vocab=128)
    with pytest.raises(RuntimeError, match="scorer failed"):
        compress_cache(model, inputs, 0.5, FailsAtLayer(), "zigzag")
    assert len(arena.free_blocks) == 1
    compress_cache(model, inputs, 0.5, "knorm", "zigzag")
    assert len(allocate.requests) == 1


def test_without_cuda_or_an_arena_nothing_parks():
    assert HostParking.open(torch.device("cpu"), [1024]) is None


# ---------------------------------------------------------------------------------------------- CUDA


def _pinned_blocks() -> int | None:
    """Pinned host blocks torch's allocator has created so far (None: this torch does not count them)."""
    if not hasattr(torch.cuda, "host_memory_stats"):
        return None
    stats = torch.cuda.host_memory_stats()
    return stats.get("num_host_alloc", stats.get("allocations.allocated", 0))  # the second: older torch


def _cuda_ids(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (1, length), generator=g).to("cuda")


def _fresh_run(model, ids: torch.Tensor, **kwargs):
    """The compression with a new arena (new pinned memory), the default arena put back after."""
    device = ids.device
    set_host_arena(device, HostArena())
    try:
        return compress_cache(model, ids, **kwargs)
    finally:
        set_host_arena(device, None)


@pytest.mark.gpu
@pytest.mark.parametrize("scorer", ["knorm", "expected_attention+pool25"])
def test_cuda_a_second_compression_pins_nothing_and_equals_a_fresh_run(scorer):
    model = tiny_llama("sdpa", layers=4).to("cuda", torch.bfloat16)
    kwargs = {"ratio": 0.5, "scorer": scorer, "budget": "zigzag"}
    arena = HostArena()
    set_host_arena(torch.device("cuda"), arena)
    try:
        compress_cache(model, _cuda_ids(4000, 0), **kwargs)
        torch.cuda.synchronize()
        pinned = _pinned_blocks()
        ours = [compress_cache(model, _cuda_ids(n, seed), **kwargs) for n, seed in ((4000, 1), (3600, 2))]
        torch.cuda.synchronize()
        assert arena.allocations == 1
        assert _pinned_blocks() == pinned
    finally:
        set_host_arena(torch.device("cuda"), None)
    for cache, (n, seed) in zip(ours, ((4000, 1), (3600, 2))):
        _assert_same_cache(cache, _fresh_run(model, _cuda_ids(n, seed), **kwargs))


@pytest.mark.gpu
def test_cuda_back_to_back_compressions_on_two_streams_equal_fresh_runs():
    """The second compression parks into the memory the first just read, with no host sync between
    them and from another stream, so only the arena's fence orders its copies after those reads."""
    model = tiny_llama("sdpa", layers=4).to("cuda", torch.bfloat16)
    kwargs = {"ratio": 0.6, "scorer": "snapkv", "budget": "zigzag"}
    compress_cache(model, _cuda_ids(3000, 0), **kwargs)  # the arena's block exists
    side = torch.cuda.Stream()
    first = compress_cache(model, _cuda_ids(3000, 1), **kwargs)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        second = compress_cache(model, _cuda_ids(2900, 2), **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _assert_same_cache(first, _fresh_run(model, _cuda_ids(3000, 1), **kwargs))
    _assert_same_cache(second, _fresh_run(model, _cuda_ids(2900, 2), **kwargs))
