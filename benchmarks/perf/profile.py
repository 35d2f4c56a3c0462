"""Where the time of prefill + compression goes on the GPU (Llama-3.1-8B shape, random weights).

    python -m benchmarks.perf.profile --length 32768 --scorer expected_attention --budget zigzag

Prints the operators with the most GPU time for the plain prefill and for compression, so that the
overhead of compression can be read operator by operator.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.perf.run import Meter, build_model, llama_8b_config, plain_prefill
from zigzag import compress_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--scorer", default="expected_attention")
    parser.add_argument("--budget", default="zigzag")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    model = build_model(llama_8b_config(args.length + 1024), "cuda", torch.bfloat16)
    ids = torch.randint(10, 128000, (1, args.length), device="cuda")
    meter = Meter("cuda")
    runs = {
        "plain prefill": lambda: plain_prefill(model, ids),
        f"{args.scorer}/{args.budget}": lambda: compress_cache(model, ids, args.ratio, args.scorer, args.budget),
    }
    for name, fn in runs.items():
        for _ in range(2):
            _, seconds, _ = meter(fn)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            meter(fn)
        print(f"\n=== {name}: {seconds:.3f} s wall (unprofiled)")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
