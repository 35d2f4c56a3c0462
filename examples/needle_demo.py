"""Compress needle-in-a-haystack prompts with several configurations side by side: memory and answers.

    python examples/needle_demo.py [--prompts 4] [--tokens 2000] [--ratios 0.5,0.75]

Each prompt (a 7-digit magic number hidden in Paul Graham's essays, asked for after the context) is
prefilled once with SmolLM2-135M-Instruct and compressed with every configuration below; the model
then answers from each compressed cache. The table shows, per configuration and ratio, how many
answers are right and how much cache memory is held, beside the uncompressed cache. Runs on an idle
2-core CPU in about two minutes (the first run also converts the model, about 25 s).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from zigzag import cache_kwarg, load_smollm2, prefill_context
from zigzag.testing.needle import needle_prompt

CONFIGURATIONS = (
    ("expected_attention+pool25", "uniform"),  # the default of compress_cache
    ("expected_attention+pool25", "zigzag"),  # ZigZagKV's layer budgets (Eq. 6)
    ("expected_attention+pool25", "zigzag+skip2"),  # the same, layers 0-1 kept at the average
    ("expected_attention+pool25", "adakv"),  # head-wise budgets
    ("tova", "uniform"),
    ("snapkv", "uniform"),
)
"""(scorer, budget) pairs compared; benchmarks/RESULTS.md has the same on 250 prompts per task."""


def full_cache_bytes(model, seq: int) -> int:
    """Bytes a plain DynamicCache would hold for ``seq`` tokens (keys + values, all layers)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * seq * head_dim * model.dtype.itemsize


def answers_right(model, tok, ids: torch.Tensor, answer: str, cache) -> bool:
    """Whether greedy decoding after ``ids (1, seq)`` from ``cache`` says ``answer`` within 10 tokens."""
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwarg(model, cache), max_new_tokens=10, do_sample=False
    )
    return answer in tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default and keeps the docstring's layout."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="needle prompts (seeds seed, seed + 1, ...; depths spread over the context)")
    parser.add_argument("--tokens", type=int, default=2000, help="haystack length in tokens")
    parser.add_argument("--ratios", default="0.5,0.75", help="fractions of the cache removed, comma-separated")
    parser.add_argument("--seed", type=int, default=7, help="seed of the first needle and its haystack")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]

    model, tok = load_smollm2(dtype=torch.float32)
    correct = {(s, b, r): 0 for s, b in CONFIGURATIONS for r in ratios}
    memory = {}
    full_right = 0
    start = time.perf_counter()
    for k in range(args.prompts):
        depth = (k + 0.5) / args.prompts
        prompt = needle_prompt(tok, args.tokens, depth=depth, seed=args.seed + k)
        ctx = tok(prompt.context, return_tensors="pt", add_special_tokens=False)
        question = tok(prompt.question, return_tensors="pt", add_special_tokens=False).input_ids
        ids = torch.cat([ctx.input_ids, question], dim=-1)
        prefill = prefill_context(model, ctx)  # once per prompt; every configuration compresses it
        full_right += answers_right(model, tok, ids, prompt.answer, copy.deepcopy(prefill.cache))  # generate appends to it
        answers = []
        for scorer, budget in CONFIGURATIONS:
            for ratio in ratios:
                cache = prefill.compress(ratio, scorer, budget)
                memory[scorer, budget, ratio] = cache.nbytes() / full_cache_bytes(model, ctx.input_ids.shape[1])
                answers.append(answers_right(model, tok, ids, prompt.answer, cache))
                correct[scorer, budget, ratio] += answers[-1]
        print(f"prompt {k + 1}/{args.prompts}: {ctx.input_ids.shape[1]} tokens, needle {prompt.answer} at depth {depth:.2f}, "
              f"{sum(answers)}/{len(answers)} compressed caches answer it")  # fmt: skip
    seconds = time.perf_counter() - start

    print(f"\nright answers out of {args.prompts}, and cache memory held (keys, values and index) against the full cache:")
    header = "".join(f" | ratio {r:<5} right  memory" for r in ratios)
    print(f"{'scorer':<26} {'budget':<13}{header}")
    print(f"{'(uncompressed)':<40}" + "".join(f" | {'':<6} {full_right:>2}/{args.prompts:<3} {1:>6.1%}" for _ in ratios))
    for scorer, budget in CONFIGURATIONS:
        cells = "".join(
            f" | {'':<6} {correct[scorer, budget, r]:>2}/{args.prompts:<3} {memory[scorer, budget, r]:>6.1%}" for r in ratios
        )
        print(f"{scorer:<26} {budget:<13}{cells}")
    print(f"\n{seconds:.0f} s on {'the GPU' if next(model.parameters()).is_cuda else 'the CPU'}, "
          "including one prefill per prompt and a 10-token answer per configuration")  # fmt: skip


if __name__ == "__main__":
    main()
