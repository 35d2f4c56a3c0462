"""Calibrate a method for one model and save its profile.

    python -m zigzag.calibrate sensitivity --model PATH --out profile.json [--text FILE]
    python -m zigzag.calibrate qfilters --model PATH --out filters.safetensors [--text FILE]

``--model`` is a Hugging Face folder or a ``.gguf`` file (``smollm2``: the packaged SmolLM2-135M-Instruct).
``--text`` is a UTF-8 text file (default: Python's standard-library docstrings, which no evaluation
haystack uses). The profile records the model, the text, the settings and the versions. Each method
takes its own settings (``python -m zigzag.calibrate METHOD --help``).
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from zigzag.calibrate.duo import DuoConfig, measure_head_patterns, pattern_summary
from zigzag.calibrate.qfilters import QFilterConfig, fit_qfilters, save_qfilters
from zigzag.calibrate.sensitivity import SensitivityConfig, measure_sensitivity, save_profile
from zigzag.calibrate.texts import stdlib_docstrings


def _sensitivity(model, ids: list[int], config: SensitivityConfig, out: Path, about: dict) -> str:
    profile = measure_sensitivity(model, ids, config, progress=True)
    save_profile(profile, out, **about)
    return " ".join(f"{x:.3g}" for x in profile["layers"])


def _duo(model, ids: list[int], config: DuoConfig, out: Path, about: dict) -> str:
    profile = measure_head_patterns(model, ids, config, progress=True)
    save_profile(profile, out, **about)
    return pattern_summary(profile)


def _qfilters(model, ids: list[int], config: QFilterConfig, out: Path, about: dict) -> str:
    filters = fit_qfilters(model, ids, config, progress=True)
    save_qfilters(out, filters, **about)
    return "share of query energy on the filter, per layer: " + " ".join(f"{x:.2f}" for x in filters.explained.mean(1))


@dataclass(frozen=True)
class _Method:
    """One subcommand: its settings (a dataclass whose fields become options), and what it does with
    the model, the tokenized text, the settings, ``--out`` and the provenance (returns a summary line)."""

    config: type
    out_help: str
    summary: str
    run: Callable[[Any, list[int], Any, Path, dict], str]


_METHODS = {
    "sensitivity": _Method(
        SensitivityConfig, "where the JSON profile goes", "per-layer sensitivity to compression (budgets)", _sensitivity
    ),
    "duo": _Method(
        DuoConfig, "where the JSON profile goes", "DuoAttention: each KV head's streaming deviation (head budgets)", _duo
    ),
    "qfilters": _Method(
        QFilterConfig, "where the .safetensors filters go", "Q-Filters: each head's main query direction", _qfilters
    ),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zigzag.calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(
        dest="method", required=True, metavar="METHOD", help="what to calibrate: " + ", ".join(_METHODS)
    )
    for name, method in _METHODS.items():
        config_cls = method.config
        m = sub.add_parser(
            name,
            help=method.summary,
            description=method.summary,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        m.add_argument("--model", required=True, help="a Hugging Face folder, a .gguf file, or 'smollm2'")
        m.add_argument("--out", type=Path, required=True, help=method.out_help)
        m.add_argument("--text", type=Path, default=None, help="calibration text file (default: stdlib docstrings)")
        m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
        m.add_argument(
            "--dtype", default=None, choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, else float32"
        )
        defaults = config_cls()
        for f in fields(config_cls):
            m.add_argument(
                f"--{f.name.replace('_', '-')}",
                type=type(getattr(defaults, f.name)),
                default=getattr(defaults, f.name),
                help=f"{config_cls.__name__}.{f.name}",
            )
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    method = _METHODS[args.method]

    from zigzag.testing.models import load_model, load_smollm2

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.model == "smollm2":
        model, tok = load_smollm2(dtype=dtype, device=args.device)
    else:
        model, tok = load_model(args.model, dtype=dtype, device=args.device)
    text = args.text.read_text(encoding="utf-8") if args.text else stdlib_docstrings()
    source = str(args.text) if args.text else "python-stdlib-docstrings"
    config = method.config(**{f.name: getattr(args, f.name) for f in fields(method.config)})
    ids = tok(text, add_special_tokens=False)["input_ids"]
    about = {
        "model": args.model,
        "model_type": model.config.model_type,
        "dtype": str(dtype),
        "text": source,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "text_tokens": len(ids),
    }
    print(f"wrote {args.out}: " + method.run(model, ids, config, args.out, about))


if __name__ == "__main__":
    main()
