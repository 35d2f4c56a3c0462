"""Merge-on-evict: the blocked PyTorch path (and the Triton kernel on CUDA) against the float64 reference.

Random cases come from hypothesis (shapes, GQA-like head counts, odd head sizes, left padding, empty
slots, block sizes, threshold and fraction); properties follow the merge rule: no eviction changes
nothing, merged values are convex combinations, evicted order and padding do not matter, inputs are
never written. A hand-computed example pins the numbers, and a subprocess checks peak memory.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from zigzag import kernels
from zigzag.merge import MERGE_CLASSES, MERGES, CosineMerge, MergeResult, get_merge, merge_chunked, merge_reference
from zigzag.merge.base import merge_quota

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


# --------------------------------------------------------------------------------------------------
# Case builder


@dataclass
class Case:
    keys: torch.Tensor  # (batch, kv_heads, seq, head_dim)
    values: torch.Tensor  # (batch, kv_heads, seq, head_dim)
    kept: torch.Tensor  # (batch, kv_heads, n) long, -1 = empty slot, empty slots first
    valid: torch.Tensor  # (batch, seq) bool

    def to(self, dtype: torch.dtype) -> Case:
        return Case(self.keys.to(dtype), self.values.to(dtype), self.kept, self.valid)

    @property
    def args(self):
        return self.keys, self.values, self.kept, self.valid


def build_case(
    seed: int,
    batch: int,
    kv_heads: int,
    seq: int,
    head_dim: int,
    pad: bool = True,
    extra_slots: int = 0,
    keep_all: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Case:
    """Random keys/values; left padding per row (if ``pad``); per (row, head) a random kept subset of
    the valid positions (all of them if ``keep_all``), right-aligned in ``n`` slots behind ``-1``s."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=torch.float64)
    values = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=torch.float64)
    lengths = [
        int(torch.randint(1, seq + 1, (1,), generator=g)) if pad and torch.rand(1, generator=g) < 0.7 else seq
        for _ in range(batch)
    ]
    valid = torch.zeros(batch, seq, dtype=torch.bool)
    for r, length in enumerate(lengths):
        valid[r, seq - length :] = True
    chosen = []
    for r in range(batch):
        row = []
        for _ in range(kv_heads):
            positions = torch.arange(seq - lengths[r], seq)
            m = lengths[r] if keep_all else int(torch.randint(0, lengths[r] + 1, (1,), generator=g))
            pick = positions[torch.randperm(lengths[r], generator=g)[:m]].sort().values
            row.append(pick)
        chosen.append(row)
    n = max(len(p) for row in chosen for p in row) + extra_slots
    kept = torch.full((batch, kv_heads, n), -1, dtype=torch.long)
    for r in range(batch):
        for h in range(kv_heads):
            p = chosen[r][h]
            if len(p):
                kept[r, h, n - len(p) :] = p
    return Case(keys.to(dtype), values.to(dtype), kept, valid)


def decisions_are_robust(case: Case, threshold: float, fraction: float, tol: float) -> bool:
    """True when no discrete choice of the rule sits within ``tol`` of flipping (float64 math on the
    case's own values): the best target beats the runner-up, the best cosine is away from 0 and the
    threshold, and the fraction cut-off separates distinct cosines. Exact ties (head_dim 1, where every
    cosine is exactly +-1 in any precision) are resolved the same way everywhere and are allowed."""
    keys, kept, valid = case.keys.double(), case.kept, case.valid
    batch, kv_heads, seq, head_dim = keys.shape
    exact = head_dim == 1
    for r in range(batch):
        for h in range(kv_heads):
            slots = [int(p) for p in kept[r, h] if p >= 0]
            targets = [p for p in slots if valid[r, p]]
            evicted = [p for p in range(seq) if valid[r, p] and p not in set(slots)]
            if not targets or not evicted:
                continue
            k_e, k_s = keys[r, h, evicted], keys[r, h, targets]
            cos = (k_e @ k_s.T) / (k_e.norm(dim=-1)[:, None] * k_s.norm(dim=-1)[None, :])
            top = cos.topk(min(2, len(targets)), dim=-1).values
            best = top[:, 0]
            if exact:
                continue
            if (best.abs() < tol).any() or (threshold > 0 and ((best - threshold).abs() < tol).any()):
                return False
            if len(targets) > 1 and ((top[:, 0] - top[:, 1] < tol) & (best > 0)).any():
                return False
            quota = merge_quota(len(evicted), fraction)
            if 0 < quota < len(evicted):
                ranked = best.sort(descending=True).values
                if ranked[quota - 1] > 0 and ranked[quota - 1] - ranked[quota] < tol:
                    return False
    return True


@st.composite
def cases(draw, keep_all: bool = False, max_seq: int = 40):
    return build_case(
        seed=draw(st.integers(0, 2**31 - 1)),
        batch=draw(st.integers(1, 3)),
        kv_heads=draw(st.integers(1, 4)),
        seq=draw(st.integers(1, max_seq)),
        head_dim=draw(st.sampled_from([1, 2, 3, 5, 8, 17])),
        pad=draw(st.booleans()),
        extra_slots=draw(st.integers(0, 3)),
        keep_all=keep_all,
    )


thresholds = st.sampled_from([0.0, 0.0, -0.5, 0.3, 0.8])
fractions = st.sampled_from([1.0, 1.0, 0.5, 0.25, 0.9])
chunk_sizes = st.sampled_from([None, 1, 2, 3, 7, 64, 1000])


def assert_same(result: MergeResult, expected: MergeResult, atol: float, rtol: float) -> None:
    assert result.values.shape == expected.values.shape
    assert result.values.dtype == expected.values.dtype
    assert result.counts.dtype == torch.float32
    torch.testing.assert_close(result.counts, expected.counts, atol=0, rtol=0)
    torch.testing.assert_close(result.values.double(), expected.values.double(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# The hand example: 2 survivors, 3 evicted, numbers worked out on paper.
#
#   pos  key     value    role
#   0    (1,0)   (2,0)    kept, slot 0, |v| = 2
#   1    (1,0)   (0,2)    evicted: cos 1 to slot 0, 0 to slot 1        -> slot 0, w = 1 * 2/(2+2) = 1/2
#   2    (1,1)   (0,-2)   evicted: cos 1/sqrt2 to both (tie: slot 0)   -> slot 0, w = (1/sqrt2) * 2/4 = sqrt2/4
#   3    (0,1)   (0,1)    kept, slot 1, |v| = 1
#   4    (0,3)   (3,0)    evicted: cos 1 to slot 1                     -> slot 1, w = 1 * 3/(3+1) = 3/4
#
#   slot 0: ((2,0) + 1/2 (0,2) + sqrt2/4 (0,-2)) / (1 + 1/2 + sqrt2/4) = (2, 1 - sqrt2/2) / (3/2 + sqrt2/4)
#   slot 1: ((0,1) + 3/4 (3,0)) / (1 + 3/4) = (9/4, 1) / (7/4) = (9/7, 4/7)


def hand_case(dtype=torch.float64) -> Case:
    keys = torch.tensor([[1, 0], [1, 0], [1, 1], [0, 1], [0, 3]], dtype=dtype)[None, None]
    values = torch.tensor([[2, 0], [0, 2], [0, -2], [0, 1], [3, 0]], dtype=dtype)[None, None]
    return Case(keys, values, torch.tensor([[[0, 3]]]), torch.ones(1, 5, dtype=torch.bool))


S2 = math.sqrt(2.0)
HAND = {
    # (threshold, fraction): (slot 0 value, slot 1 value, counts)
    (0.0, 1.0): ((2 / (1.5 + S2 / 4), (1 - S2 / 2) / (1.5 + S2 / 4)), (9 / 7, 4 / 7), (3.0, 2.0)),
    # cos 1/sqrt2 < 0.8: position 2 stays out -> slot 0 = ((2,0) + 1/2 (0,2)) / (3/2) = (4/3, 2/3)
    (0.8, 1.0): ((4 / 3, 2 / 3), (9 / 7, 4 / 7), (2.0, 2.0)),
    # quota ceil(0.5 * 3) = 2: the two cosine-1 tokens (positions 1 and 4)
    (0.0, 0.5): ((4 / 3, 2 / 3), (9 / 7, 4 / 7), (2.0, 2.0)),
    # quota 1: positions 1 and 4 tie at cosine 1, the lower position (1) wins
    (0.0, 1 / 3): ((4 / 3, 2 / 3), (0.0, 1.0), (2.0, 1.0)),
}


@pytest.mark.parametrize("threshold,fraction", list(HAND))
@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_example(impl, threshold, fraction, dtype):
    case = hand_case(dtype)
    if impl == "reference":
        out = merge_reference(*case.args, threshold=threshold, fraction=fraction)
    else:
        out = merge_chunked(*case.args, threshold=threshold, fraction=fraction, chunk_size=2)
    slot0, slot1, counts = HAND[(threshold, fraction)]
    expected = torch.tensor([[[slot0, slot1]]], dtype=torch.float64)
    assert out.values.dtype == dtype
    torch.testing.assert_close(out.values.double(), expected, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0)
    assert out.counts.tolist() == [[list(counts)]]


def test_negative_cosine_and_zero_value_never_merge():
    # slot 0 key (1,0); position 1 points away (cos -1); position 2 is parallel but has a zero value.
    keys = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0]])[None, None]
    values = torch.tensor([[1.0, 1.0], [5.0, 5.0], [0.0, 0.0]])[None, None]
    kept, valid = torch.tensor([[[0]]]), torch.ones(1, 3, dtype=torch.bool)
    for out in (merge_reference(keys, values, kept, valid, threshold=-1.0), merge_chunked(keys, values, kept, valid)):
        assert out.values.tolist() == [[[[1.0, 1.0]]]]
        assert out.counts.tolist() == [[[1.0]]]


def test_empty_slots_and_kept_padding():
    # Row 0 keeps 1 token behind an empty slot; row 1 (left-padded by 2) keeps a padding position,
    # which holds its own value, absorbs nothing, and is not a merge target.
    case = build_case(seed=3, batch=2, kv_heads=2, seq=6, head_dim=4, pad=False)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False
    kept = torch.tensor([[[-1, 2], [-1, 5]], [[1, 4], [-1, 3]]])
    for out in (
        merge_reference(case.keys, case.values, kept, valid),
        merge_chunked(case.keys, case.values, kept, valid),
    ):
        assert out.values[0, :, 0].abs().sum() == 0 and out.counts[0, :, 0].tolist() == [0.0, 0.0]
        assert out.values[1, 1, 0].abs().sum() == 0 and out.counts[1, 1, 0] == 0
        torch.testing.assert_close(out.values[1, 0, 0], case.values[1, 0, 1])
        assert out.counts[1, 0, 0] == 1.0
    ref = merge_reference(case.keys, case.values, kept, valid)
    assert_same(merge_chunked(case.keys, case.values, kept, valid), ref, atol=1e-12, rtol=1e-12)
    # row 1, head 0: evicted 2, 3 and 5 can only go to position 4 (the only target), if their cosine is > 0
    k = case.keys[1, 0].double()
    cos = torch.nn.functional.cosine_similarity(k[[2, 3, 5]], k[4][None], dim=-1)
    assert ref.counts[1, 0, 1] == 1 + int((cos > 0).sum())


def test_no_slots_and_all_empty():
    case = build_case(seed=1, batch=2, kv_heads=3, seq=9, head_dim=5)
    empty = torch.empty(2, 3, 0, dtype=torch.long)
    for fn in (merge_reference, merge_chunked):
        out = fn(case.keys, case.values, empty, case.valid)
        assert out.values.shape == (2, 3, 0, 5) and out.counts.shape == (2, 3, 0)
        out = fn(case.keys, case.values, torch.full((2, 3, 4), -1), case.valid)
        assert out.values.abs().sum() == 0 and out.counts.abs().sum() == 0


# --------------------------------------------------------------------------------------------------
# Chunked == reference


@SETTINGS
@given(case=cases(), threshold=thresholds, fraction=fractions, chunk_size=chunk_sizes)
def test_chunked_matches_reference_float64(case, threshold, fraction, chunk_size):
    assume(decisions_are_robust(case, threshold, fraction, tol=1e-9))
    expected = merge_reference(*case.args, threshold=threshold, fraction=fraction)
    got = merge_chunked(*case.args, threshold=threshold, fraction=fraction, chunk_size=chunk_size)
    assert_same(got, expected, atol=1e-12, rtol=1e-10)


@SETTINGS
@given(
    case=cases(),
    threshold=thresholds,
    fraction=fractions,
    chunk_size=chunk_sizes,
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_chunked_matches_reference_low_precision(case, threshold, fraction, chunk_size, dtype):
    case = case.to(dtype)  # the reference sees the same rounded inputs, in float64
    assume(decisions_are_robust(case, threshold, fraction, tol=1e-4))
    expected = merge_reference(*case.args, threshold=threshold, fraction=fraction)
    got = merge_chunked(*case.args, threshold=threshold, fraction=fraction, chunk_size=chunk_size)
    # float32 math, then one rounding to the output dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    assert_same(got, expected, atol=tol, rtol=tol)


def test_cosine_merge_uses_chunked_on_cpu():
    case = build_case(seed=7, batch=2, kv_heads=2, seq=30, head_dim=8)
    method = CosineMerge(threshold=0.1, fraction=0.5, chunk_size=4)
    got = method.merge(*case.args)
    assert_same(got, merge_chunked(*case.args, threshold=0.1, fraction=0.5, chunk_size=4), atol=0, rtol=0)
    assert method.name == "cosine" and not method.preserve_mass


# --------------------------------------------------------------------------------------------------
# Properties


@SETTINGS
@given(case=cases(keep_all=True), chunk_size=chunk_sizes, threshold=thresholds)
def test_no_eviction_changes_nothing(case, chunk_size, threshold):
    ok = case.kept >= 0
    gathered = case.values.gather(2, case.kept.clamp_min(0)[..., None].expand(-1, -1, -1, case.values.shape[-1]))
    gathered = torch.where(ok[..., None], gathered, torch.zeros(()).double())
    for out in (
        merge_reference(*case.args, threshold=threshold),
        merge_chunked(*case.args, threshold=threshold, chunk_size=chunk_size),
        merge_chunked(*case.to(torch.float32).args, threshold=threshold, chunk_size=chunk_size),
    ):
        assert torch.equal(out.values, gathered.to(out.values.dtype))
        assert torch.equal(out.counts, ok.float())


@SETTINGS
@given(case=cases(), threshold=thresholds, fraction=fractions, chunk_size=chunk_sizes)
def test_merged_values_are_convex_combinations(case, threshold, fraction, chunk_size):
    out = merge_chunked(*case.args, threshold=threshold, fraction=fraction, chunk_size=chunk_size)
    batch, kv_heads, _ = case.kept.shape
    for r in range(batch):
        for h in range(kv_heads):
            slots = case.kept[r, h][case.kept[r, h] >= 0]
            evicted = case.valid[r].clone()
            evicted[slots] = False
            pool = case.values[r, h, evicted]  # (E, head_dim): what any slot of this (row, head) could absorb
            ok = case.kept[r, h] >= 0
            own = case.values[r, h, case.kept[r, h][ok]]  # (slots, head_dim) each survivor's own value
            lo, hi = own, own
            if len(pool):
                lo = torch.minimum(own, pool.min(dim=0).values)
                hi = torch.maximum(own, pool.max(dim=0).values)
            v = out.values[r, h, ok]
            assert (v >= lo - 1e-12).all() and (v <= hi + 1e-12).all()
            counts = out.counts[r, h, ok]
            assert (counts >= 1).all() and (out.counts[r, h, ~ok] == 0).all()
            # every absorbed token is counted once, in exactly one slot
            assert counts.sum() - len(slots) <= len(pool)


def _reconstruct(case: Case, threshold: float) -> torch.Tensor:
    """The merged values rebuilt from explicit weights (an independent restatement of the rule)."""
    keys, values = case.keys.double(), case.values.double()
    out = torch.zeros(*case.kept.shape, keys.shape[-1], dtype=torch.float64)
    for r in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            slots = [(j, int(p)) for j, p in enumerate(case.kept[r, h]) if p >= 0]
            members = {j: [(1.0, values[r, h, p])] for j, p in slots}
            targets = [(j, p) for j, p in slots if case.valid[r, p]]
            for e in range(keys.shape[2]):
                if not case.valid[r, e] or e in {p for _, p in slots} or not targets:
                    continue
                cos = [
                    float(torch.nn.functional.cosine_similarity(keys[r, h, e], keys[r, h, p], dim=0))
                    for _, p in targets
                ]
                t = cos.index(max(cos))
                j, p = targets[t]
                ne, ns = float(values[r, h, e].norm()), float(values[r, h, p].norm())
                if cos[t] > 0 and cos[t] >= threshold and ne > 0:
                    members[j].append((cos[t] * ne / (ne + ns), values[r, h, e]))
            for j, terms in members.items():
                total = sum(w for w, _ in terms)
                out[r, h, j] = sum(w * v for w, v in terms) / total
    return out


@SETTINGS
@given(case=cases(max_seq=16), threshold=thresholds)
def test_matches_explicit_convex_weights(case, threshold):
    assume(decisions_are_robust(case, threshold, 1.0, tol=1e-9))
    out = merge_chunked(*case.args, threshold=threshold, chunk_size=5)
    torch.testing.assert_close(out.values, _reconstruct(case, threshold), atol=1e-12, rtol=1e-10)


@SETTINGS
@given(case=cases(), threshold=thresholds, fraction=fractions, chunk_size=chunk_sizes)
def test_inputs_are_never_written(case, threshold, fraction, chunk_size):
    before = [t.clone() for t in case.args]
    merge_chunked(*case.args, threshold=threshold, fraction=fraction, chunk_size=chunk_size)
    merge_reference(*case.args, threshold=threshold, fraction=fraction)
    for t, b in zip(case.args, before):
        assert torch.equal(t, b)


@SETTINGS
@given(case=cases(), threshold=thresholds, chunk_size=chunk_sizes, seed=st.integers(0, 2**31 - 1))
def test_order_of_evicted_tokens_does_not_matter(case, threshold, chunk_size, seed):
    g = torch.Generator().manual_seed(seed)
    keys, values = case.keys.clone(), case.values.clone()
    for r in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            kept = {int(p) for p in case.kept[r, h] if p >= 0}
            evicted = torch.tensor(
                [p for p in range(keys.shape[2]) if case.valid[r, p] and p not in kept], dtype=torch.long
            )
            if len(evicted) > 1:
                shuffled = evicted[torch.randperm(len(evicted), generator=g)]
                keys[r, h, evicted] = case.keys[r, h, shuffled]
                values[r, h, evicted] = case.values[r, h, shuffled]
    a = merge_chunked(*case.args, threshold=threshold, chunk_size=chunk_size)
    b = merge_chunked(keys, values, case.kept, case.valid, threshold=threshold, chunk_size=chunk_size)
    assert_same(b, a, atol=1e-12, rtol=1e-10)


@settings(SETTINGS, max_examples=30)
@given(
    case=cases(max_seq=20),
    threshold=thresholds,
    fraction=fractions,
    chunk_size=chunk_sizes,
    garbage=st.sampled_from(["nan", "inf", "huge"]),
)
def test_padding_never_contributes(case, threshold, fraction, chunk_size, garbage):
    pad = ~case.valid[:, None, :, None].expand_as(case.keys)
    assume(bool(pad.any()))
    fill = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30}[garbage]
    keys = case.keys.masked_fill(pad, fill)
    values = case.values.masked_fill(pad, -fill if garbage != "nan" else fill)
    for fn, kwargs in ((merge_chunked, {"chunk_size": chunk_size}), (merge_reference, {})):
        a = fn(*case.args, threshold=threshold, fraction=fraction, **kwargs)
        b = fn(keys, values, case.kept, case.valid, threshold=threshold, fraction=fraction, **kwargs)
        assert torch.equal(a.values, b.values) and torch.equal(a.counts, b.counts)


# --------------------------------------------------------------------------------------------------
# Registry and argument checks


def test_get_merge():
    assert get_merge(None) is None and get_merge(False) is None and get_merge("none") is None
    assert get_merge("Cosine") == CosineMerge()
    assert set(MERGES.values()) == set(MERGE_CLASSES) and all(MERGES[cls.name] is cls for cls in MERGE_CLASSES)
    custom = CosineMerge(threshold=0.5, preserve_mass=True)
    assert get_merge(custom) is custom
    with pytest.raises(ValueError, match="cosine"):
        get_merge("average")
    for bad in (True, 3, CosineMerge, object()):
        with pytest.raises(TypeError):
            get_merge(bad)


@pytest.mark.parametrize(
    "kwargs", [{"threshold": 1.5}, {"fraction": 0.0}, {"fraction": 1.2}, {"chunk_size": 0}]
)
def test_cosine_merge_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        CosineMerge(**kwargs)


def test_merge_rejects_bad_inputs():
    case = build_case(seed=0, batch=2, kv_heads=2, seq=5, head_dim=3)
    k, v, kept, valid = case.args
    with pytest.raises(ValueError, match="keys and values"):
        merge_chunked(k, v[..., :2], kept, valid)
    with pytest.raises(ValueError, match="kept"):
        merge_chunked(k, v, kept[:1], valid)
    with pytest.raises(TypeError, match="kept"):
        merge_chunked(k, v, kept.float(), valid)
    with pytest.raises(ValueError, match="valid"):
        merge_chunked(k, v, kept, valid[:, :3])
    with pytest.raises(TypeError, match="valid"):
        merge_chunked(k, v, kept, valid.long())
    with pytest.raises(ValueError, match="fraction"):
        merge_chunked(k, v, kept, valid, fraction=0)
    with pytest.raises(ValueError, match="chunk_size"):
        merge_chunked(k, v, kept, valid, chunk_size=-3)
    with pytest.raises(ValueError, match="merge backend"):
        kernels.set_backend("merge", "cuda")


# --------------------------------------------------------------------------------------------------
# Memory: the blocked path never holds the (seq x n) similarity matrix

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from zigzag.merge import merge_chunked

    torch.manual_seed(0)
    batch, kv_heads, seq, n, head_dim, chunk = 1, 8, 20000, 2000, 32, 512
    keys = torch.randn(batch, kv_heads, seq, head_dim)
    values = torch.randn(batch, kv_heads, seq, head_dim)
    kept = torch.stack([torch.randperm(seq)[:n].sort().values for _ in range(kv_heads)])[None]
    valid = torch.ones(batch, seq, dtype=torch.bool)
    merge_chunked(keys[:, :, :64], values[:, :, :64], kept[..., :8] % 64, valid[:, :64], chunk_size=16)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = merge_chunked(keys, values, kept, valid, chunk_size=chunk)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert out.counts.sum() > n
    print(json.dumps({"peak_growth": after - before, "full_matrix": batch * kv_heads * seq * n * 4,
                      "block": batch * kv_heads * chunk * n * 4, "values": values.nbytes}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux-specific")
def test_chunked_peak_memory_is_bounded():
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    # The full float32 similarity matrix would be 1.28 GB; one block is 33 MB and the values 20 MB.
    # Peak RSS growth is typically ~55 MB (allocator noise sometimes adds ~120 MB).
    assert stats["peak_growth"] < stats["full_matrix"] / 4, stats


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active (no monkeypatching)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.largest:
                self.largest, self.op = t.untyped_storage().nbytes(), str(func)
        return out


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_chunked_never_allocates_more_than_a_block(fraction):
    batch, kv_heads, seq, n, head_dim, chunk = 1, 8, 20000, 2000, 32, 512
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(batch, kv_heads, seq, head_dim, generator=g)
    values = torch.randn(batch, kv_heads, seq, head_dim, generator=g)
    kept = torch.stack([torch.randperm(seq, generator=g)[:n].sort().values for _ in range(kv_heads)])[None]
    valid = torch.ones(batch, seq, dtype=torch.bool)
    with LargestTensor() as mode:
        out = merge_chunked(keys, values, kept, valid, fraction=fraction, chunk_size=chunk)
    assert out.counts.sum() > n * kv_heads
    block = batch * kv_heads * chunk * n * 4  # one block of float32 similarities (33 MB)
    full = batch * kv_heads * seq * n * 4  # the whole matrix (1.28 GB)
    # the largest intermediate is one similarity block, or a values-sized accumulation buffer (20 MB)
    assert mode.largest <= max(block, values.nbytes) < full / 30, (mode.largest, mode.op)


# --------------------------------------------------------------------------------------------------
# CUDA: the PyTorch path and the fused Triton search against the reference (skipped without CUDA)


def _random_cases(count: int, max_seq: int = 120):
    g = torch.Generator().manual_seed(1234)
    for seed in range(count):
        pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
        shape = {
            "batch": pick(1, 3),
            "kv_heads": pick(1, 4),
            "seq": pick(1, max_seq),
            "head_dim": [2, 3, 16, 17, 64, 65, 128, 256][pick(0, 7)],
            "pad": bool(pick(0, 1)),
            "extra_slots": pick(0, 2),
        }
        yield seed, shape, [0.0, 0.3, -0.2][pick(0, 2)], [1.0, 0.5, 0.9][pick(0, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_matches_reference(backend, dtype):
    if backend == "triton":
        pytest.importorskip("triton")
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    checked = 0
    for seed, shape, threshold, fraction in _random_cases(40):
        case = build_case(seed, **shape).to(dtype)
        if not decisions_are_robust(case, threshold, fraction, tol=1e-4):
            continue
        expected = merge_reference(*case.args, threshold=threshold, fraction=fraction)
        cuda = [t.cuda() for t in case.args]
        with kernels.using("merge", backend):
            got = CosineMerge(threshold=threshold, fraction=fraction).merge(*cuda)
        assert got.values.is_cuda and got.counts.is_cuda
        assert_same(MergeResult(got.values.cpu(), got.counts.cpu()), expected, atol=tol, rtol=tol)
        checked += 1
    assert checked >= 20


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_search_matches_torch_at_scale(dtype):
    pytest.importorskip("triton")
    from zigzag.merge.chunked import best_match_torch, gather_survivors
    from zigzag.merge.triton import best_match_triton

    case = build_case(5, batch=2, kv_heads=8, seq=3000, head_dim=128, pad=True).to(dtype)
    keys, values, kept, valid = (t.cuda() for t in case.args)
    surv = gather_survivors(keys, values, kept, valid)
    best_t, slot_t = best_match_torch(keys, surv, 256)
    best_k, slot_k = best_match_triton(keys, surv, 256)
    ev = surv.evicted
    torch.testing.assert_close(best_k[ev], best_t[ev].float(), atol=2e-6, rtol=0)
    # slots must agree wherever the winner is clear (and the best is positive, i.e. it matters)
    unit = lambda x: x.float() / x.float().norm(dim=-1, keepdim=True)
    sim = unit(keys) @ (unit(surv.keys) * surv.target[..., None]).transpose(-1, -2)  # (b, h, seq, n)
    top2 = sim.topk(2, dim=-1).values
    clear = ev & (top2[..., 0] - top2[..., 1] > 1e-4) & (top2[..., 0] > 1e-4)
    assert clear.float().sum() > 0.9 * (ev & (top2[..., 0] > 1e-4)).float().sum()
    assert torch.equal(slot_k[clear], slot_t[clear])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_search_kernel_in_the_interpreter(dtype):
    """The fused search on the CPU through Triton's interpreter (tests/conftest.py sets it without
    CUDA): only evicted positions are searched, and there it equals the PyTorch search."""
    if torch.cuda.is_available():
        pytest.skip("the GPU tests run the compiled kernel")
    pytest.importorskip("triton")
    from zigzag.merge.chunked import best_match_torch, gather_survivors
    from zigzag.merge.triton import best_match_triton

    case = build_case(int(torch.randint(0, 10_000, ())), batch=2, kv_heads=2, seq=300, head_dim=32, pad=True).to(dtype)
    surv = gather_survivors(*case.args)
    best_t, slot_t = best_match_torch(case.args[0], surv, 64)
    best_k, slot_k = best_match_triton(case.args[0], surv, 64)
    ev = surv.evicted
    assert ev.any() and (~ev).any()
    torch.testing.assert_close(best_k[ev], best_t[ev].float(), atol=1e-3 if dtype == torch.float16 else 1e-6, rtol=0)
    assert torch.equal(best_k[~ev], torch.zeros_like(best_k[~ev])) and torch.equal(slot_k[~ev], torch.zeros_like(slot_k[~ev]))
    sure = ev & (best_t > 1e-3)
    agree = (slot_k[sure] == slot_t[sure]).float().mean()
    assert agree > 0.98  # near-ties may pick another slot in float16


def test_triton_op_passes_opcheck():
    """zigzag::cosine_best_match has a fake and mutates nothing (in the interpreter without CUDA)."""
    pytest.importorskip("triton")
    from zigzag.kernels.merge_triton import cosine_best_match

    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    keys = torch.randn(1, 2, 40, 16, device=device, dtype=dtype)
    surv = torch.randn(1, 2, 12, 16, device=device, dtype=dtype)
    inv = 1.0 / surv.float().norm(dim=-1)
    searched = torch.rand(1, 2, 40, device=device) > 0.5
    torch.library.opcheck(cosine_best_match, (keys, surv, inv, searched))


def test_switch_sends_cosine_merge_to_the_kernel():
    """CosineMerge follows the "merge" switch: the kernel (in the interpreter without CUDA) gives the
    PyTorch path's merge where no decision is a near tie."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in range(20):
        case = build_case(int(torch.randint(0, 10_000, ())), batch=2, kv_heads=2, seq=60, head_dim=16, pad=True)
        if decisions_are_robust(case, 0.0, 1.0, tol=1e-4):
            break
    else:
        pytest.skip("no case without near ties")
    args = [t.to(device) for t in case.to(torch.float32).args]
    out = {}
    for backend in ("torch", "triton"):
        with kernels.using("merge", backend):
            out[backend] = CosineMerge().merge(*args)
    assert_same(out["triton"], out["torch"], atol=1e-5, rtol=1e-5)
