"""benchmarks/perf/generate.py: decode timed through model.generate, on a tiny model on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from benchmarks.perf import generate as bench
from benchmarks.perf import run as perf
from zigzag import compress_cache
from zigzag.cache.varlen import VarlenLayer


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model and the one-row caches of a 64-token context: none, dense uniform, varlen adakv."""
    model = perf.build_model(perf.tiny_config(512), "cpu", torch.float32)
    context = torch.randint(10, 256, (1, 64), generator=torch.Generator().manual_seed(3))
    caches = {"none": perf.plain_prefill(model, context)}
    for budget in ("uniform", "adakv"):
        caches[budget] = compress_cache(model, context, ratio=0.5, scorer="expected_attention", budget=budget)
    assert all(isinstance(layer, VarlenLayer) for layer in caches["adakv"].layers)
    return model, context, caches


def _stored(cache) -> list[torch.Tensor]:
    """Clones of every tensor a layer stores (a varlen layer's prefix and tail buffer too)."""
    names = ("keys", "values", "prefix_keys", "prefix_values", "positions", "_tail_keys", "kept_positions")
    return [getattr(layer, n).clone() for layer in cache.layers for n in names if isinstance(getattr(layer, n, None), torch.Tensor)]


def test_repeated_copies_decode_while_the_one_row_caches_stay_as_they_were(tiny, one_thread):
    model, context, caches = tiny
    inputs = bench.continuation(context, 2)
    ids = inputs["input_ids"]
    assert ids.shape == (2, 65) and torch.equal(ids[1, :64], context[0]) and bool(inputs["attention_mask"].all())
    for budget, cache in caches.items():
        before = _stored(cache)
        copy = bench.repeated(cache, 2)
        steps = bench.generate_ms(model, copy, inputs, new_tokens=5, warmup=1, sync=False)
        assert len(steps) == 5 - 1 - 1 and all(ms > 0 for ms in steps)  # 5 stamps, 4 steps, 1 dropped
        assert copy.get_seq_length() == 64 + 5 and copy.layers[0].keys.shape[0] == 2
        assert cache.get_seq_length() == 64, budget
        for old, now in zip(before, _stored(cache)):
            assert torch.equal(old, now), budget


@pytest.mark.parametrize("padded", [False, True])
def test_attention_gets_a_mask_at_every_step_only_after_padding(tiny, monkeypatch, one_thread, padded):
    model, context, caches = tiny
    masks = []
    real = VarlenLayer.attend
    spy = lambda self, query, keys, values, mask, *args: masks.append(mask) or real(self, query, keys, values, mask, *args)
    monkeypatch.setattr(VarlenLayer, "attend", spy)
    inputs = bench.continuation(context, 2, padded)
    assert inputs["input_ids"].shape == (2, 66 if padded else 65)
    bench.generate_ms(model, bench.repeated(caches["adakv"], 2), inputs, new_tokens=3, warmup=0, sync=False)
    assert len(masks) == 3 * len(caches["adakv"].layers)  # every layer of every forward
    assert all((mask is not None) == padded for mask in masks)


def test_bytes_needed_covers_the_repeated_cache_after_generating(tiny, one_thread):
    model, context, caches = tiny
    for budget, cache in caches.items():
        need = bench.bytes_needed(cache, 4, new_tokens=8, headroom=100)
        assert need > 4 * perf.cache_bytes(cache) + 100
        copy = bench.repeated(cache, 4)
        bench.generate_ms(model, copy, bench.continuation(context, 4), new_tokens=8, warmup=0, sync=False)
        assert perf.cache_bytes(copy) <= need - 100, budget  # a varlen tail counts its whole buffer


def test_step_clock_rotation_and_speed_against():
    clock = bench.StepClock()
    clock.stamps = [0.0, 0.001, 0.003, 0.006]
    assert clock.step_ms(1) == pytest.approx([2.0, 3.0])
    assert bench.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert bench.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    speed, bounds = bench.speed_against([5.0, 40.0, 10.0], [10.0, 20.0, 10.0])  # ratios 2, 0.5, 1
    assert speed == 1.0 and bounds == [0.5, 2.0]
    assert bench.speed_against([5.0], []) == (None, None)


def test_the_stop_flag_is_read_every_step_off_mps():
    # generate reads unfinished_sequences back to the host every step (5.17, 5.25): no sync of our own.
    assert not bench.defers_stop_check(torch.device("cpu"))


def test_script_runs_and_skips_a_cache_that_cannot_fit(tmp_path, capsys, monkeypatch, one_thread):
    # An uncompressed cache needs 2000 bytes a row, a compressed one 1000; 3000 are free.
    fake = lambda cache, batch, new_tokens, headroom: batch * (2000 if type(cache) is DynamicCache else 1000)
    monkeypatch.setattr(bench, "bytes_needed", fake)
    bench.main(["--tiny", "--lengths", "64", "--batches", "2,1", "--budgets", "none,uniform,adakv", "--reps", "2",
                "--new-tokens", "5", "--warmup", "1", "--profile-tokens", "2", "--with-loop",
                "--memory-gib", str(3000 / 2**30), "--out", str(tmp_path)])  # fmt: skip
    lines = (tmp_path / "generate.jsonl").read_text().splitlines()
    info, rows = json.loads(lines[0])["info"], [json.loads(line) for line in lines[1:]]
    assert info["args"]["reps"] == 2 and info["stop_check_deferred"] is False
    timed = {(r["batch"], r["budget"]): r for r in rows if r["ms_per_token"] is not None}
    assert set(timed) == {(1, "none"), (1, "uniform"), (1, "adakv"), (2, "uniform"), (2, "adakv")}
    skipped = [r for r in rows if r["ms_per_token"] is None]
    assert [(r["batch"], r["budget"]) for r in skipped] == [(2, "none")]
    assert skipped[0]["skipped"] == "needs 0.0 MiB at batch 2, 0.0 MiB free"  # 4000 bytes against 3000
    for (batch, budget), r in timed.items():
        assert len(r["round_ms"]) == 2 and r["ms_min"] <= r["ms_per_token"] <= r["ms_max"]
        low, high = r["vs_uniform_range"]
        assert low <= r["vs_uniform"] <= high
        assert (r["vs_none"] is None) == (batch == 2)  # no uncompressed cache at batch 2
        assert r["gpu_busy_ms"] is None and r["reads_per_step"] > 0 and "loop_ms_per_token" in r
    assert timed[(1, "uniform")]["vs_uniform"] == 1.0 and timed[(1, "adakv")]["varlen_layers"] == 4
    out = capsys.readouterr().out
    assert "| 64 | 2 | none | skipped: needs" in out and "| 64 | 1 | adakv |" in out
