"""Sanity check: does the uncompressed SmolLM2-135M-Instruct solve a few generated RULER-style samples?

Not a test (minutes on a CPU). The prompt is the chat template applied to ``user_message(sample)``
with the answer prefix appended; decoding is greedy. Uses the development seed 0 by default.

    python -m benchmarks.ruler.sanity --tasks niah_single_1 niah_single_2 niah_multikey_1 --samples 5
"""

from __future__ import annotations

import argparse
import time

import torch

from zigzag.testing.models import load_model, load_smollm2

from ..cli import HelpFormatter
from .tasks import TASKS, generate_task, score_output, user_message

# New tokens per task: a 7-digit number is 7 tokens; a UUID about 25; lists of values or words need more.
MAX_NEW_TOKENS = {
    "niah_single_3": 64,
    "niah_multikey_3": 64,
    "niah_multivalue": 64,
    "niah_multiquery": 64,
    "vt": 48,
    "cwe": 96,
    "fwe": 48,
    "qa_1": 32,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ruler.sanity", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument(
        "--tasks", nargs="+", default=["niah_single_1", "niah_single_2", "niah_multikey_1"], choices=TASKS,
        metavar="TASK", help=f"tasks to run, uncompressed ({', '.join(TASKS)})",
    )
    parser.add_argument("--samples", type=int, default=5, help="samples per task")
    parser.add_argument("--length", type=int, default=4096, help="target prompt length in tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated samples")
    parser.add_argument("--model", default=None, help="a Hugging Face folder or .gguf file (None: the packaged SmolLM2)")
    parser.add_argument("--device", default="cpu", help="torch device")
    args = parser.parse_args(argv)

    model, tok = load_smollm2(device=args.device) if args.model is None else load_model(args.model, device=args.device)
    for task in args.tasks:
        scores = []
        for sample in generate_task(task, tok, args.length, args.samples, args.seed):
            chat = [{"role": "user", "content": user_message(sample)}]
            prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + sample.answer_prefix
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=MAX_NEW_TOKENS.get(task, 32),
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            scores.append(score_output(sample, text))
            print(
                f"{task} #{sample.index} ({ids.shape[1]} tokens, {time.perf_counter() - start:.1f} s) "
                f"score {scores[-1]:5.1f} refs {list(sample.references)} output {text.strip()[:160]!r}",
                flush=True,
            )
        print(f"== {task}: {sum(scores) / len(scores):.1f} over {len(scores)} samples", flush=True)


if __name__ == "__main__":
    main()
