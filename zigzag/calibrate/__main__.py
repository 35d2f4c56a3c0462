"""Calibrate a method for one model and save its profile.

    python -m zigzag.calibrate sensitivity --model PATH --out profile.json [--text FILE]

``--model`` is a Hugging Face folder or a ``.gguf`` file (``smollm2``: the packaged SmolLM2-135M-Instruct).
``--text`` is a UTF-8 text file (default: Python's standard-library docstrings, which no evaluation
haystack uses). The profile records the model, the text, the settings and the versions.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import fields
from pathlib import Path

import torch

from zigzag.calibrate.sensitivity import SensitivityConfig, measure_sensitivity, save_profile
from zigzag.calibrate.texts import stdlib_docstrings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m zigzag.calibrate", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("method", choices=["sensitivity"], help="what to calibrate")
    p.add_argument("--model", required=True, help="a Hugging Face folder, a .gguf file, or 'smollm2'")
    p.add_argument("--out", type=Path, required=True, help="where the JSON profile goes")
    p.add_argument("--text", type=Path, default=None, help="calibration text file (default: stdlib docstrings)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, else float32"
    )
    defaults = SensitivityConfig()
    for f in fields(SensitivityConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"SensitivityConfig.{f.name}",
        )
    args = p.parse_args(argv)

    from zigzag.testing.models import load_model, load_smollm2

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.model == "smollm2":
        model, tok = load_smollm2(dtype=dtype, device=args.device)
    else:
        model, tok = load_model(args.model, dtype=dtype, device=args.device)
    text = args.text.read_text(encoding="utf-8") if args.text else stdlib_docstrings()
    source = str(args.text) if args.text else "python-stdlib-docstrings"
    config = SensitivityConfig(**{f.name: getattr(args, f.name) for f in fields(SensitivityConfig)})
    ids = tok(text, add_special_tokens=False)["input_ids"]
    profile = measure_sensitivity(model, ids, config, progress=True)
    save_profile(
        profile,
        args.out,
        model=args.model,
        model_type=model.config.model_type,
        dtype=str(dtype),
        text=source,
        text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        text_tokens=len(ids),
    )
    print(f"wrote {args.out}: " + " ".join(f"{x:.3g}" for x in profile["layers"]))


if __name__ == "__main__":
    main()
