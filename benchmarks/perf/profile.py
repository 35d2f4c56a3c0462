"""Where the overhead of compression over plain prefill comes from (Llama-3.1-8B shape, random weights).

    python -m benchmarks.perf.profile --length 32768 --cases knorm/uniform,expected_attention/uniform,expected_attention/zigzag

Plain prefill is profiled once; then, for each case (``scorer/budget`` at ``--ratio``), in about 45
lines (three cases fit in a 12,000-character log tail):

* ``wall``: median of ``--reps`` unprofiled runs, each right after an unprofiled plain prefill
  (interleaved, so drift hits both), and their ratio;
* ``GPU time``: the summed duration of all GPU activity (kernels, copies, memsets) of one profiled
  run, against plain prefill's;
* ``GPU busy / idle``: busy is the union of those intervals over all streams (from the trace); idle
  is the unprofiled median wall minus busy. It is approximate: busy comes from the profiled run,
  wall from the unprofiled ones (the profiled run's own wall minus busy is printed too);
* ``syncs``: how often the host waited for the GPU or read a value back: CPU-side
  ``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` / ``cudaEventSynchronize`` / ``cudaMemcpy``
  (the blocking one) / ``aten::item`` / ``aten::_local_scalar_dense`` calls, and GPU-side
  ``Memcpy DtoH`` copies (``Device -> Pinned`` ones are zigzag's asynchronous parking of tokens, not
  waits); plain prefill's count, then the case's;
* ``ops``: per operator name, the GPU time of the kernels it launched itself (self time) and its
  calls, for the operators where the case has more than plain prefill (``--rows`` of them, largest
  difference first), with the share of the difference that they and kernels launched outside any
  operator explain;
* ``kernels``: the same per GPU kernel name (``--kernel-rows``).

``--tiny`` runs a toy model on the CPU (CPU activity only: the tables show self CPU time, there is
no GPU part): it checks the script and measures nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.cli import HelpFormatter
from benchmarks.perf.run import (
    Meter,
    build_model,
    busy_time,
    is_gpu_activity,
    llama_8b_config,
    plain_prefill,
    tiny_config,
)
from zigzag import compress_cache
from zigzag.pipeline.layerwise import FINALIZE_RANGE, LayerwiseCompressor

HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "aten::item", "aten::_local_scalar_dense")
DEVICE_TO_HOST = "Memcpy DtoH"  # GPU-side copies to the host: "Memcpy DtoH (Device -> Pinned)", ...


@dataclass
class Profile:
    """One profiled run, summed by name. Times in microseconds.

    ``ops``: CPU-side operator name -> [self GPU time (self CPU time without a GPU), calls].
    ``kernels``: GPU activity name -> [time, count]. ``busy_us``: union of the GPU activity over all
    streams. ``syncs``: counts of :data:`HOST_SYNCS` names and of GPU-side device-to-host copies.
    ``settle``: ZigZag's work once every LMBA is known (:data:`zigzag.pipeline.layerwise.FINALIZE_RANGE`),
    ``(host span, time from its start to the end of the GPU activity, GPU busy in that time)`` in
    microseconds; None when the run had no such range. ``settle_kernels``: the GPU activity after
    that range started, by name, as ``kernels``; ``settle_host``: the host-side events inside that
    range (operators and CUDA runtime calls), by self CPU time.
    """

    wall_s: float
    ops: dict[str, list[float]] = field(default_factory=dict)
    kernels: dict[str, list[float]] = field(default_factory=dict)
    busy_us: float = 0.0
    syncs: Counter = field(default_factory=Counter)
    settle: tuple[float, float, float] | None = None
    settle_kernels: dict[str, list[float]] = field(default_factory=dict)
    settle_host: dict[str, list[float]] = field(default_factory=dict)

    @property
    def gpu_us(self) -> float:
        """Summed duration of all GPU activity (overlapping streams counted twice)."""
        return sum(us for us, _ in self.kernels.values())

    @property
    def op_us(self) -> float:
        """The part of :attr:`gpu_us` launched by some operator (all self CPU time without a GPU)."""
        return sum(us for us, _ in self.ops.values())


def summarize(events, wall_s: float, on_gpu: bool) -> Profile:
    """Sum the profiler's ``events`` (``prof.events()``) by name into a :class:`Profile`."""
    out = Profile(wall_s)
    intervals = []
    named = []  # (name, start, end) of every GPU activity
    host = []  # (name, start, self CPU time) of every host event
    settle_range = None
    for event in events:
        if event.device_type == DeviceType.CPU:
            if event.name == FINALIZE_RANGE:
                settle_range = (event.time_range.start, event.time_range.end)
            host.append((event.name, event.time_range.start, event.self_cpu_time_total))
            if event.is_async:
                continue
            entry = out.ops.setdefault(event.name, [0.0, 0])
            entry[0] += event.self_device_time_total if on_gpu else event.self_cpu_time_total
            entry[1] += 1
            if event.name in HOST_SYNCS:
                out.syncs[event.name] += 1
        elif is_gpu_activity(event):
            entry = out.kernels.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us()
            entry[1] += 1
            intervals.append((event.time_range.start, event.time_range.end))
            named.append((event.name, event.time_range.start, event.time_range.end))
            if event.name.startswith(DEVICE_TO_HOST):
                out.syncs[event.name] += 1
    out.busy_us = busy_time(intervals)
    if settle_range is not None:
        start, end = settle_range
        gpu_end = max([end] + [e for _, e in intervals])
        inside = [(max(s, start), e) for s, e in intervals if e > start]
        out.settle = (end - start, gpu_end - start, busy_time(inside))
        for name, s, e in named:
            if e > start:
                entry = out.settle_kernels.setdefault(name, [0.0, 0])
                entry[0] += e - max(s, start)
                entry[1] += 1
        for name, s, self_us in host:
            if start <= s <= end and name != FINALIZE_RANGE:
                entry = out.settle_host.setdefault(name, [0.0, 0])
                entry[0] += self_us
                entry[1] += 1
    return out


def profile_run(fn: Callable[[], object], meter: Meter) -> Profile:
    """Profile one call of ``fn`` (CPU, plus CUDA on a GPU), synchronized at both ends."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if meter.cuda else [])
    meter.free()
    meter.sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        out = fn()
        meter.sync()
        wall = time.perf_counter() - start
    del out
    return summarize(prof.events(), wall, meter.cuda)


def interleaved_walls(case: Callable[[], object], plain: Callable[[], object], reps: int, meter: Meter) -> tuple[float, float]:
    """Median unprofiled seconds of ``case`` and of ``plain``, run alternately ``reps`` times each."""
    case_s, plain_s = [], []
    for _ in range(reps):
        plain_s.append(meter(plain)[1])
        case_s.append(meter(case)[1])
    return statistics.median(case_s), statistics.median(plain_s)


@contextlib.contextmanager
def settle_timer(meter: Meter):
    """Time :meth:`zigzag.pipeline.layerwise.LayerwiseCompressor.settle` in unprofiled runs: yields a list
    that gets each call's seconds, from its start (the forward pass is done: the LMBA were read back)
    to the end of the GPU work it queued. The wrapper adds one synchronisation at the end of the call,
    where the run synchronises anyway."""
    times: list[float] = []
    original = LayerwiseCompressor.settle

    def timed(self, plan):
        start = time.perf_counter()
        original(self, plan)
        meter.sync()
        times.append(time.perf_counter() - start)

    LayerwiseCompressor.settle = timed
    try:
        yield times
    finally:
        LayerwiseCompressor.settle = original


def _ms(us: float) -> str:
    """Microseconds as milliseconds, one decimal."""
    return f"{us / 1000:.1f}"


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def diff_table(case: dict, plain: dict, rows: int, title: str, unit: str, width: int) -> tuple[list[str], float]:
    """Markdown rows of the names with more time or more calls in ``case`` than in ``plain`` (largest
    time difference first, then largest call difference; at most ``rows``), and the time difference
    those rows add up to, in microseconds. ``case`` and ``plain``: name -> [time in us, calls]."""
    zero = (0.0, 0)

    def more(name: str) -> tuple[float, int]:
        (case_us, case_n), (plain_us, plain_n) = case.get(name, zero), plain.get(name, zero)
        return case_us - plain_us, case_n - plain_n

    names = [n for n in case.keys() | plain.keys() if max(more(n)) > 0]
    names = sorted(names, key=lambda n: (-more(n)[0], -more(n)[1], n))[:rows]
    lines = [f"| {title} | +{unit} ms | case ms | plain ms | +calls | case calls |", "|---|---|---|---|---|---|"]
    for name in names:
        extra_us, extra_n = more(name)
        case_us, case_n = case.get(name, zero)
        lines.append(f"| {_short(name, width)} | {_ms(extra_us)} | {_ms(case_us)} | {_ms(case_us - extra_us)} | {extra_n:+d} | {case_n} |")
    return lines, sum(more(n)[0] for n in names)


def overview(prof: Profile, wall_s: float) -> list[str]:
    """Plain prefill's line: its wall, GPU time, busy and idle time."""
    line = f"wall {wall_s:.3f} s (median of unprofiled runs)"
    if prof.kernels:
        line += (f"; GPU time {_ms(prof.gpu_us)} ms; busy {_ms(prof.busy_us)} ms; idle ≈ wall - busy "
                 f"{_ms(wall_s * 1e6 - prof.busy_us)} ms (profiled run: {_ms(prof.wall_s * 1e6 - prof.busy_us)} ms)")
    return [line]


def case_report(name: str, prof: Profile, wall_s: float, plain: Profile, plain_wall_s: float, *,
                reps: int, rows: int, kernel_rows: int) -> list[str]:
    """The lines printed for one case against plain prefill (about 45 at the default row counts)."""
    gpu = bool(plain.kernels or prof.kernels)
    unit = "GPU" if gpu else "CPU"
    lines = [f"=== {name}",
             f"wall {wall_s:.3f} s / plain {plain_wall_s:.3f} s = {wall_s / plain_wall_s:.3f}x (medians of {reps}, interleaved, unprofiled)"]
    if gpu:
        lines.append(
            f"GPU time {_ms(prof.gpu_us)} / {_ms(plain.gpu_us)} ms = {prof.gpu_us / plain.gpu_us:.3f}x "
            f"(+{_ms(prof.gpu_us - plain.gpu_us)} ms); busy {_ms(prof.busy_us)} / {_ms(plain.busy_us)} ms; "
            f"idle ≈ wall - busy {_ms(wall_s * 1e6 - prof.busy_us)} / {_ms(plain_wall_s * 1e6 - plain.busy_us)} ms "
            f"(approximate: busy of the profiled run, whose own idle is {_ms(prof.wall_s * 1e6 - prof.busy_us)} ms)")
    if prof.settle is not None:
        host, span, busy = prof.settle
        lines.append(f"budgets settled after the forward pass: {_ms(span)} ms from their start to the GPU's last "
                     f"activity (host {_ms(host)} ms), GPU busy {_ms(busy)} ms of it; there, by GPU time:")
        lines += diff_table(prof.settle_kernels, {}, kernel_rows, "settle kernel", unit, 60)[0]
        lines += diff_table(prof.settle_host, {}, kernel_rows, "settle host call (self)", "CPU", 60)[0]
    syncs = sorted(prof.syncs.keys() | plain.syncs.keys())
    lines.append("syncs plain -> case: " + (", ".join(f"{s} {plain.syncs[s]} -> {prof.syncs[s]}" for s in syncs) or "none"))
    table, shown = diff_table(prof.ops, plain.ops, rows, "op (self time)", unit, 50)
    lines += table
    if gpu:
        outside = (prof.gpu_us - prof.op_us) - (plain.gpu_us - plain.op_us)
        lines.append(f"(op rows: +{_ms(shown)} of +{_ms(prof.gpu_us - plain.gpu_us)} ms GPU time; "
                     f"kernels launched outside any op: +{_ms(outside)} ms)")
        lines += diff_table(prof.kernels, plain.kernels, kernel_rows, "kernel", unit, 60)[0]
    else:
        lines.append(f"(op rows: +{_ms(shown)} of +{_ms(prof.op_us - plain.op_us)} ms CPU time)")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.profile", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--length", type=int, default=32768, help="context length in tokens")
    parser.add_argument("--cases", default="knorm/uniform,expected_attention/uniform,expected_attention/zigzag",
                        help="comma-separated scorer/budget pairs")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the cache removed")
    parser.add_argument("--reps", type=int, default=3, help="unprofiled runs for the wall-time medians")
    parser.add_argument("--rows", type=int, default=25, help="rows of the per-operator difference")
    parser.add_argument("--kernel-rows", type=int, default=8, help="rows of the per-kernel difference")
    parser.add_argument("--tiny", action="store_true", help="toy model on the CPU: checks the script, measures nothing")
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    config = (tiny_config if args.tiny else llama_8b_config)(args.length + 1024)
    model = build_model(config, device, torch.float32 if args.tiny else torch.bfloat16)
    ids = torch.randint(10, config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0)).to(device)
    meter = Meter(device)
    name = torch.cuda.get_device_name() if meter.cuda else "cpu (tiny check)"
    print(f"profile: {name}, torch {torch.__version__}, T={args.length}, ratio {args.ratio}", flush=True)

    def plain() -> object:
        return plain_prefill(model, ids)

    meter(plain)  # warm-up: kernels, allocator pools
    plain_wall_s = statistics.median(meter(plain)[1] for _ in range(args.reps))
    plain_prof = profile_run(plain, meter)
    print("\n".join(["=== plain prefill"] + overview(plain_prof, plain_wall_s)), flush=True)
    for case in args.cases.split(","):
        scorer, budget = case.split("/")

        def run(scorer=scorer, budget=budget) -> object:
            return compress_cache(model, ids, args.ratio, scorer, budget)

        meter(run)  # warm-up: this case's kernels, pinned host blocks
        with settle_timer(meter) as settle_s:
            wall_s, plain_wall_s = interleaved_walls(run, plain, args.reps, meter)
        lines = case_report(case, profile_run(run, meter), wall_s, plain_prof, plain_wall_s,
                            reps=args.reps, rows=args.rows, kernel_rows=args.kernel_rows)
        if settle_s:
            lines.insert(2, f"budgets settled in {statistics.median(settle_s) * 1e3:.1f} ms (median of the unprofiled "
                            f"runs, from the forward pass's end to the GPU's: the wall time they add)")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
