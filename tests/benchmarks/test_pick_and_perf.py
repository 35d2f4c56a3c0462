"""The development-seed picker chooses by the dev records only, and the GPU benchmark scripts run
(benchmarks/perf: run.py and profile.py, on a tiny model on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from benchmarks.perf import profile as perf_profile
from benchmarks.perf import run as perf
from benchmarks.ruler.pick import choose, pick
from benchmarks.ruler.pick import main as pick_main
from benchmarks.ruler.report import CORE_TASKS
from zigzag import cache_kwarg


def _write(out: Path, rows: list[tuple[str, str, float, float]]) -> None:
    """rows: (scorer, budget, ratio, score for every core task)."""
    with open(out / "samples.rank0.jsonl", "w") as f:
        for scorer, budget, ratio, score in rows:
            for task in CORE_TASKS:
                setting = f"{scorer}|{budget}|{ratio:g}|off"
                record = {"task": task, "index": 0, "protocol": "agnostic", "setting": setting, "scorer": scorer,
                          "budget": budget, "ratio": ratio, "merge": "off", "score": score}
                f.write(json.dumps(record) + "\n")


def test_pick_takes_the_best_mean_of_half_and_three_quarters(tmp_path):
    _write(tmp_path, [
        ("none", "none", 0.0, 90.0),
        ("a", "uniform", 0.5, 60.0), ("a", "uniform", 0.75, 40.0),  # mean 50
        ("b", "uniform", 0.5, 55.0), ("b", "uniform", 0.75, 50.0),  # mean 52.5: best overall
        ("a", "zigzag+skip2", 0.5, 58.0), ("a", "zigzag+skip2", 0.75, 30.0),  # mean 44: best zigzag
        ("b", "zigzag", 0.5, 50.0), ("b", "zigzag", 0.75, 30.0),
        ("c", "zigzag", 0.5, 99.0),  # 0.75 missing: not eligible
    ])
    assert pick(tmp_path) == ("b", "uniform", "off", 52.5)
    assert pick(tmp_path, "zigzag") == ("a", "zigzag+skip2", "off", 44.0)
    with pytest.raises(SystemExit, match="pyramid"):
        pick(tmp_path, "pyramid")


def _write_families(out: Path, rows: list[tuple[str, str, float, dict[str, float]]]) -> None:
    """rows: (scorer, budget, ratio, {haystack family: score for every core task})."""
    with open(out / "samples.rank0.jsonl", "w") as f:
        for scorer, budget, ratio, by_family in rows:
            for family, score in by_family.items():
                f.writelines(json.dumps({"task": task, "haystack": family, "index": 0, "protocol": "agnostic",
                                         "setting": f"{scorer}|{budget}|{ratio:g}|off", "scorer": scorer,
                                         "budget": budget, "ratio": ratio, "merge": "off", "score": score}) + "\n"
                             for task in CORE_TASKS)


def _both(essays: float, noise: float) -> dict[str, float]:
    return {"essays": essays, "noise": noise}


def test_pick_across_families_takes_the_best_mean_and_names_the_worst_family(tmp_path, capsys):
    _write_families(tmp_path, [
        ("none", "none", 0.0, _both(90.0, 80.0)),
        ("a", "uniform", 0.5, _both(60.0, 40.0)), ("a", "uniform", 0.75, _both(50.0, 30.0)),  # mean 45
        ("b", "zigzag", 0.5, _both(70.0, 20.0)), ("b", "zigzag", 0.75, _both(60.0, 40.0)),  # mean 47.5, noise 30
        ("c", "zigzag", 0.5, {"essays": 99.0}), ("c", "zigzag", 0.75, {"essays": 99.0}),  # no noise: not eligible
        ("d", "uniform", 0.25, _both(99.0, 99.0)), ("d", "uniform", 0.5, _both(10.0, 10.0)),
    ])
    choice = choose(tmp_path)
    assert choice == ("b", "zigzag", "off", 47.5, "noise", 30.0, ("essays", "noise"))
    assert pick(tmp_path, "uniform") == ("a", "uniform", "off", 45.0)
    assert pick(tmp_path, ratios=(0.25, 0.5)) == ("d", "uniform", "off", 54.5)  # the only one at 0.25
    pick_main([str(tmp_path), "--ratios", "0.5"])
    assert capsys.readouterr().out.splitlines() == ["a uniform off 50.00", "worst family: noise 40.00"]
    with pytest.raises(SystemExit, match="every haystack family"):
        pick(tmp_path, "zigzag", ratios=(0.25,))


def test_pick_on_an_old_folder_prints_one_line(tmp_path, capsys):
    _write(tmp_path, [("a", "uniform", 0.5, 60.0), ("a", "uniform", 0.75, 40.0)])  # no haystack field
    pick_main([str(tmp_path)])
    assert capsys.readouterr().out == "a uniform off 50.00\n"
    assert choose(tmp_path).families == ("ruler",)


@pytest.fixture
def one_thread():
    """The tiny runs are many small ops: on a shared CPU, one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_perf_script_runs_on_a_tiny_model(tmp_path, capsys, one_thread):
    perf.main(["--tiny", "--lengths", "128", "--sections", "overhead,chunked", "--chunk-size", "64",
               "--long-length", "256", "--decode-steps", "2", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "perf.jsonl").read_text().splitlines()]
    methods = {(r.get("section"), r.get("method")) for r in rows}
    assert ("overhead", "none") in methods and ("overhead", "expected_attention/zigzag") in methods
    assert ("chunked", "expected_attention/zigzag chunk=64") in methods
    compressed = [r for r in rows if r.get("method") == "knorm/uniform"][0]
    uncompressed = [r for r in rows if r.get("method") == "none"][0]
    assert 0.45 < compressed["kv_bytes"] / uncompressed["kv_bytes"] < 0.6  # ratio 0.5, plus the slot index
    assert "| overhead | none | 128 |" in capsys.readouterr().out


HEAD_METHODS = [f"expected_attention/{b}" for b in ("uniform", "adakv", "zigzag_heads")]


def test_heads_section_times_every_budget_at_every_batch(tmp_path, capsys, one_thread):
    perf.main(["--tiny", "--lengths", "128", "--sections", "heads", "--decode-batches", "1,2",
               "--decode-rounds", "2", "--round-steps", "2", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "perf.jsonl").read_text().splitlines()][1:]
    assert [(r["method"], r["batch"]) for r in rows] == [(m, b) for b in (1, 2) for m in HEAD_METHODS]
    for r in rows:
        assert r["section"] == "heads" and r["tokens"] == 128 and r["timing"] == "all interleaved"
        assert len(r["decode_round_ms"]) == 2 and 0 < r["decode_ms_min"] <= r["decode_ms"]
        uniform = next(u for u in rows if u["batch"] == r["batch"] and u["method"] == HEAD_METHODS[0])
        assert r["speed_vs_uniform"] == pytest.approx(uniform["decode_ms"] / r["decode_ms"], abs=2e-3)
        low, high = r["speed_vs_uniform_range"]
        assert low <= high and r["gpu_busy_ms"] is None  # no GPU
        same_cache = next(o for o in rows if o["method"] == r["method"] and o["batch"] == 1)
        assert (r["prefill_s"], r["kv_bytes"]) == (same_cache["prefill_s"], same_cache["kv_bytes"])  # built once
    assert {r["method"]: r["varlen_layers"] for r in rows}[HEAD_METHODS[1]] == 4  # adakv: every layer varlen
    assert "| 128 | 2 | expected_attention/adakv |" in capsys.readouterr().out


@torch.no_grad()
def _next_logits(model, cache, length):
    token = torch.zeros(1, 1, dtype=torch.long)
    out = model(input_ids=token, attention_mask=torch.ones(1, length + 1, dtype=torch.long),
                position_ids=torch.tensor([[length]]), **cache_kwarg(model, cache), use_cache=True)
    perf.restore_length(cache, length)
    return out.logits


def test_interleaved_decode_alternates_and_leaves_varlen_caches_as_they_were(monkeypatch, one_thread):
    from zigzag import compress_cache
    from zigzag.cache.varlen import VarlenLayer

    model = perf.build_model(perf.tiny_config(512), "cpu", torch.float32)
    ids = torch.randint(10, 256, (1, 96), generator=torch.Generator().manual_seed(1))
    caches = {b: compress_cache(model, ids, ratio=0.5, scorer="expected_attention", budget=b) for b in ("uniform", "adakv")}
    assert all(isinstance(layer, VarlenLayer) for layer in caches["adakv"].layers)
    before = {b: _next_logits(model, c, 96) for b, c in caches.items()}
    order = []
    real = perf.decode_times
    name = {id(c): b for b, c in caches.items()}
    monkeypatch.setattr(perf, "decode_times", lambda m, c, *a: order.append(name.get(id(c), c.get_seq_length())) or real(m, c, *a))

    decodes = perf.interleaved_decode(model, caches, 1, 3, 2, perf.Meter("cpu"))
    assert order == ["uniform", "adakv", "adakv", "uniform", "uniform", "adakv"]
    assert [len(t) for t in decodes["adakv"].rounds] == [2, 2, 2] and decodes["adakv"].gpu_ms == []  # no GPU
    for b, cache in caches.items():  # restored: same length, nothing appended, same next-token logits
        assert cache.get_seq_length() == 96 and all(layer.appended == 0 for layer in cache.layers)
        torch.testing.assert_close(_next_logits(model, cache, 96), before[b])

    order.clear()
    decodes = perf.interleaved_decode(model, caches, 3, 1, 2, perf.Meter("cpu"))  # repeated copies, not the caches
    assert order == [96, 96] and set(decodes) == set(caches)
    assert all(layer.keys.shape[0] == 1 for layer in caches["uniform"].layers)
    assert all(layer.batch == 1 for layer in caches["adakv"].layers)


def test_compare_decode_falls_back_to_pairs_then_to_null(monkeypatch):
    ms = {"u": 10.0, "a": 20.0, "z": 8.0}
    fits = {3: {"u", "a", "z"}, 2: {"u", "a"}, 4: {"u"}}  # batch -> the caches whose copies fit together

    def fake(model, caches, batch, rounds, steps, meter):
        if not set(caches) <= fits[batch]:
            raise torch.OutOfMemoryError("out of memory (test)")
        return {m: perf.Decode([[ms[m]] * steps for _ in range(rounds)], [ms[m] / 2]) for m in caches}

    monkeypatch.setattr(perf, "interleaved_decode", fake)
    caches, meter = dict.fromkeys(ms), perf.Meter("cpu")
    together = perf.compare_decode(None, caches, 3, 2, 2, meter)
    assert list(together) == ["u", "a", "z"] and {f["timing"] for f in together.values()} == {"all interleaved"}
    assert (together["u"]["speed_vs_uniform"], together["a"]["speed_vs_uniform"], together["z"]["speed_vs_uniform"]) == (1.0, 0.5, 1.25)
    assert together["a"]["speed_vs_uniform_range"] == [0.5, 0.5] and together["a"]["decode_round_ms"] == [20.0, 20.0]
    assert (together["z"]["gpu_busy_ms"], together["z"]["gpu_busy_share"], together["z"]["gpu_speed_vs_uniform"]) == (4.0, 0.5, 1.25)

    pairs = perf.compare_decode(None, caches, 2, 2, 2, meter)
    assert (pairs["u"]["timing"], pairs["a"]["timing"], pairs["z"]["timing"]) == ("pairwise", "pairwise with uniform", "out of memory")
    assert pairs["a"]["speed_vs_uniform"] == 0.5 and pairs["z"]["decode_ms"] is None and pairs["z"]["speed_vs_uniform"] is None
    assert pairs["u"]["decode_ms"] == 10.0 and pairs["u"]["gpu_busy_ms"] == 5.0

    none_fit = perf.compare_decode(None, caches, 4, 2, 2, meter)
    assert all(f["decode_ms"] is None and f["speed_vs_uniform"] is None for f in none_fit.values())


def test_profile_script_runs_on_a_tiny_model(capsys, one_thread):
    perf_profile.main(["--tiny", "--length", "96", "--cases", "knorm/uniform,expected_attention/zigzag", "--reps", "1"])
    out = capsys.readouterr().out
    cases = out.split("=== ")[2:]
    assert [c.splitlines()[0] for c in cases] == ["knorm/uniform", "expected_attention/zigzag"]
    for case in cases:
        lines = case.splitlines()
        assert len(lines) <= 80
        assert lines[1].startswith("wall ") and "x (medians of 1," in lines[1]
        settles = lines[0].endswith("/zigzag")  # ZigZag budgets are settled after the forward pass: timed, profiled
        if settles:
            assert lines[2].startswith("budgets settled in ") and "ms (median of the unprofiled runs" in lines[2]
            assert lines[3].startswith("budgets settled after the forward pass: ")
            assert "| settle kernel |" in case and "| settle host call (self) |" in case
        syncs = next(i for i, line in enumerate(lines) if line.startswith("syncs plain -> case: "))
        assert syncs == 2 or settles
        assert "aten::item 0 -> " in lines[syncs]
        assert lines[syncs + 1] == "| op (self time) | +CPU ms | case ms | plain ms | +calls | case calls |"


def _event(name, device, start=0.0, end=0.0, self_us=0.0, annotation=False):
    """A stand-in for a profiler FunctionEvent: what perf.profile.summarize reads."""
    span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, device_type=device, is_async=False, is_user_annotation=annotation,
                           time_range=span, self_device_time_total=self_us, self_cpu_time_total=0.0)


def test_profile_gpu_summary_and_report_from_events():
    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    plain = perf_profile.summarize([_event("aten::mm", cpu, self_us=1000.0), _event("gemm", gpu, 0, 1000),
                                    _event("cudaDeviceSynchronize", cpu)], 0.0012, True)
    case = perf_profile.summarize([
        _event("aten::mm", cpu, self_us=1500.0), _event("gemm", gpu, 0, 1000), _event("gemm", gpu, 1500, 2000),
        _event("aten::item", cpu), _event("aten::_local_scalar_dense", cpu), _event("cudaStreamSynchronize", cpu),
        _event("Memcpy DtoH (Device -> Pageable)", gpu, 2000, 2010), _event("cudaDeviceSynchronize", cpu),
        _event("triton_side_stream", gpu, 1800, 2600),  # overlaps the second gemm, launched outside any op
        _event("CompiledFunction", gpu, 0, 3000, annotation=True),  # a record_function range: not GPU work
    ] + [_event(f"aten::op{i}", cpu) for i in range(40)], 0.003, True)  # more calls, no GPU time
    assert case.gpu_us == 2310 and case.busy_us == 2100 and plain.busy_us == 1000
    assert case.syncs == {"aten::item": 1, "aten::_local_scalar_dense": 1, "cudaStreamSynchronize": 1,
                          "cudaDeviceSynchronize": 1, "Memcpy DtoH (Device -> Pageable)": 1}
    lines = perf_profile.case_report("ea/zigzag", case, 0.0025, plain, 0.00125, reps=3, rows=25, kernel_rows=8)
    assert len(lines) <= 80
    assert lines[1] == "wall 0.003 s / plain 0.001 s = 2.000x (medians of 3, interleaved, unprofiled)"
    assert lines[2].startswith("GPU time 2.3 / 1.0 ms = 2.310x (+1.3 ms); busy 2.1 / 1.0 ms; idle ≈ wall - busy 0.4 / 0.2 ms")
    assert "cudaDeviceSynchronize 1 -> 1" in lines[3] and "aten::item 0 -> 1" in lines[3]
    assert lines[6] == "| aten::mm | 0.5 | 1.5 | 1.0 | +0 | 1 |"
    # 25 rows: aten::mm (most time), then the +1 calls by name: _local_scalar_dense, item, op0, op1, op10, ...
    assert lines[7].startswith("| aten::_local_scalar_dense |") and sum(line.startswith("| aten::op") for line in lines) == 22
    assert lines[31] == "(op rows: +0.5 of +1.3 ms GPU time; kernels launched outside any op: +0.8 ms)"
    assert lines[32:] == ["| kernel | +GPU ms | case ms | plain ms | +calls | case calls |", "|---|---|---|---|---|---|",
                          "| triton_side_stream | 0.8 | 0.8 | 0.0 | +1 | 1 |", "| gemm | 0.5 | 1.5 | 1.0 | +1 | 2 |",
                          "| Memcpy DtoH (Device -> Pageable) | 0.0 | 0.0 | 0.0 | +1 | 1 |"]


def test_host_overhead_script_runs_on_the_cpu(capsys, one_thread):
    """The kernel runs in Triton's interpreter here (tests/conftest.py), so only the script is checked."""
    pytest.importorskip("triton")
    from benchmarks.perf import host_overhead

    host_overhead.main(["--device", "cpu", "--slots", "64", "--repeats", "1"])
    rows = [line.split("|")[1:3] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [name.strip() for name, _ in rows] == [
        "sdpa", "dense layer step", "varlen layer step", "varlen attend", "varlen_attention", "triton launch",
        "direct launch",
    ]  # fmt: skip
    assert all(float(us) > 0 for _, us in rows)
