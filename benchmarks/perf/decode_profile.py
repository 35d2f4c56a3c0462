"""Where the host time of a decoding step goes, per budget (Llama-3.1-8B shape, random weights).

    python -m benchmarks.perf.decode_profile --length 8192 --budgets uniform,adakv --steps 20

At batch 1 an eager decoding step is bound by the host (Python and kernel launches), not by the GPU
(``benchmarks.perf --sections heads`` prints the GPU-busy share), so a slower step is extra Python.
For each budget this compresses one context (expected_attention at ``--ratio``), then runs
``--steps`` decoding steps under ``cProfile`` and prints the mean host ms per step and the functions
with the most own time per step (``--rows``). Cache length barely matters to host time: a short
context is enough. ``--tiny`` runs a toy model on the CPU to check the script.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from benchmarks.cli import HelpFormatter
from benchmarks.perf.run import (
    Meter,
    _decode_steps,
    build_model,
    llama_8b_config,
    restore_length,
    tiny_config,
)
from zigzag import compress_cache


def profile_steps(model, cache, steps: int, meter: Meter) -> tuple[float, pstats.Stats]:
    """Host ms per step and the profile of ``steps`` decoding steps continuing ``cache`` (restored after)."""
    length = cache.get_seq_length()
    token = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    mask = torch.ones(1, length + steps + 4, dtype=torch.long, device=model.device)
    _decode_steps(model, cache, token, mask, length, 2, meter)  # warm-up (kernels compiled, buffers grown)
    restore_length(cache, length)
    profiler = cProfile.Profile()
    profiler.enable()
    times = _decode_steps(model, cache, token, mask, length, steps, meter)
    profiler.disable()
    restore_length(cache, length)
    return 1000 * sum(times) / len(times), pstats.Stats(profiler)


def top_functions(stats: pstats.Stats, steps: int, rows: int) -> list[str]:
    """The ``rows`` functions with the most own time, in microseconds per step."""
    entries = []
    for (path, line, name), (_calls, ncalls, own, cumulative, _callers) in stats.stats.items():
        where = f"{path.rsplit('/', 2)[-2:][-1]}:{line}" if path != "~" else "builtin"
        entries.append((own, cumulative, ncalls, f"{name} ({where})"))
    entries.sort(reverse=True)
    lines = ["| function | own us/step | cumulative us/step | calls/step |", "|---|---|---|---|"]
    for own, cumulative, ncalls, label in entries[:rows]:
        lines.append(f"| {label[:70]} | {1e6 * own / steps:.0f} | {1e6 * cumulative / steps:.0f} | {ncalls / steps:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.decode_profile", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--length", type=int, default=8192, help="context length compressed before decoding")
    parser.add_argument("--budgets", default="uniform,adakv", help="comma list of budget names, profiled one after the other")
    parser.add_argument("--scorer", default="expected_attention", help="scorer name")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the cache removed")
    parser.add_argument("--steps", type=int, default=20, help="decoding steps run under cProfile")
    parser.add_argument("--rows", type=int, default=18, help="functions listed, most own time first")
    parser.add_argument("--tiny", action="store_true", help="toy model on the CPU (checks the script)")
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    config = tiny_config(args.length + 256) if args.tiny else llama_8b_config(args.length + 256)
    model = build_model(config, device, torch.float32 if args.tiny else torch.bfloat16)
    ids = torch.randint(10, config.vocab_size - 10, (1, args.length), device=device)
    meter = Meter(device)
    out = io.StringIO()
    for budget in args.budgets.split(","):
        cache = compress_cache(model, ids, args.ratio, args.scorer, budget)
        ms, stats = profile_steps(model, cache, args.steps, meter)
        print(f"=== {args.scorer}/{budget}: {ms:.2f} ms per step (under cProfile, which inflates Python time)", file=out)
        print("\n".join(top_functions(stats, args.steps, args.rows)), file=out)
        del cache
    print(out.getvalue())


if __name__ == "__main__":
    main()
