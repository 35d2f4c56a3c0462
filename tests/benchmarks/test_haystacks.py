"""Haystack families (benchmarks/ruler/haystacks.py): every core task on every family, and the readers.

The fetched families (novels, manuals) skip when their files are missing; fetch them once with
``python -m benchmarks.ruler.haystacks --fetch`` (scripts/setup.sh does). The R and groff readers are
also tested on small inputs written here, so they are covered without the fetch.
"""

from __future__ import annotations

import gzip
import itertools
import re
import struct
import zlib

import pytest

from benchmarks.ruler import haystacks
from benchmarks.ruler.common import TOLERANCE, prompt_tokens
from benchmarks.ruler.haystacks import FAMILIES, FETCH_COMMAND, groff_sentences, novel_sentences, split_sentences
from benchmarks.ruler.tasks import HAYSTACK_TASKS, generate_task

CORE = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery")


@pytest.fixture(scope="module")
def tok():
    from zigzag.testing.models import load_smollm2_tokenizer

    return load_smollm2_tokenizer()


def _sentences(family: str) -> tuple[str, ...]:
    """The family's sentences, or a skip naming the fetch command when they were not fetched."""
    try:
        return haystacks.sentences(family)
    except FileNotFoundError:
        pytest.skip(f"the {family!r} haystack is not fetched (`{FETCH_COMMAND}`)")


def _long(family: str) -> set[str]:
    """The family's sentences long enough not to occur by chance in another text; noise: its five."""
    if family == "noise":
        return set(haystacks.sentences("noise"))
    return {s for s in _sentences(family) if len(s) >= 40}


def _others(family: str) -> set[str]:
    """The long sentences of the other prose families that are available (fetched or installed)."""
    out: set[str] = set()
    for other in ("essays", "novels", "manuals"):
        if other != family:
            try:
                out |= {s for s in haystacks.sentences(other) if len(s) >= 40}
            except FileNotFoundError:
                pass
    return out


def test_families():
    assert FAMILIES == ("essays", "novels", "manuals", "noise")
    assert set(HAYSTACK_TASKS) == {*CORE, "niah_single_3", "vt"}


@pytest.mark.parametrize("family", FAMILIES)
def test_sentences_are_clean(family):
    units = _sentences(family)
    assert len(units) >= (5 if family == "noise" else 5000)
    assert all(u == " ".join(u.split()) and u for u in units)  # whitespace collapsed, one per line
    assert not any("special magic" in u for u in units)  # never mistaken for a needle


@pytest.mark.parametrize("task", CORE)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_every_core_task(family, task, tok):
    own, others = _long(family), _others(family) - _long(family)
    samples = generate_task(task, tok, 1024, 2, seed=0, haystack=family)
    for sample in samples:
        assert abs(prompt_tokens(sample, tok) - 1024) <= TOLERANCE * 1024
        assert sample.haystack == family
        # The needles are there, whole, and every reference can be found.
        assert all(ref in sample.context for ref in sample.references)
        keys = re.findall(r"[a-z]+-[a-z]+", sample.question)  # adjective-noun keys
        assert len(keys) == (4 if task == "niah_multiquery" else 1)
        assert all(re.search(rf"One of the special magic \w+ for {re.escape(k)} is: ", sample.context) for k in keys)
        # The filler is the family's text, and no other family's.
        assert sum(s in sample.context for s in own) >= (5 if family == "noise" else 3)
        assert not any(s in sample.context for s in others)
        if family != "noise":
            assert "The grass is green. The sky is blue." not in sample.context


@pytest.mark.parametrize("family", FAMILIES)
def test_vt_on_every_family(family, tok):
    own = _long(family)
    for sample in generate_task("vt", tok, 1024, 2, seed=0, haystack=family):
        assert abs(prompt_tokens(sample, tok) - 1024) <= TOLERANCE * 1024
        assert re.findall(r"VAR (\w+) = ", sample.context) == list(sample.references)
        assert sum(s in sample.context for s in own) >= 3


def test_families_differ(tok):
    available = [f for f in FAMILIES if f in ("essays", "noise") or (haystacks.folder() / f"{f}.txt").is_file()]
    built = {f: generate_task("niah_single_2", tok, 1024, 3, seed=0, haystack=f) for f in available}
    default = generate_task("niah_single_2", tok, 1024, 3, seed=0)
    for a, b in itertools.combinations([default, *built.values()], 2):
        # The family is in the seed: other keys and values, not only other filler.
        assert all(x.context != y.context and x.references != y.references for x, y in zip(a, b, strict=True))
    # Deterministic per family.
    assert built["essays"] == generate_task("niah_single_2", tok, 1024, 3, seed=0, haystack="essays")


def test_missing_family_names_the_fetch(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("ZIGZAG_HAYSTACKS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(FETCH_COMMAND)):
        haystacks.sentences("novels")
    with pytest.raises(FileNotFoundError, match=re.escape(FETCH_COMMAND)):
        generate_task("niah_single_2", tok, 1024, 1, seed=0, haystack="manuals")
    # Tasks that a family does not apply to do not need its file.
    assert generate_task("cwe", tok, 1024, 1, seed=0, haystack="novels")[0].haystack is None


def test_folder_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("ZIGZAG_HAYSTACKS", raising=False)
    monkeypatch.setenv("ZIGZAG_CACHE", str(tmp_path / "cache"))
    assert haystacks.folder() == tmp_path / "cache" / "haystacks"
    assert haystacks.folder(tmp_path / "other") == tmp_path / "other" / "haystacks"
    monkeypatch.delenv("ZIGZAG_CACHE")
    assert str(haystacks.folder()).endswith(".cache/zigzag/haystacks")
    monkeypatch.setenv("ZIGZAG_HAYSTACKS", str(tmp_path / "carried"))
    assert haystacks.folder() == tmp_path / "carried"


def test_carried_folder_is_read(tok, tmp_path, monkeypatch):
    """ZIGZAG_HAYSTACKS names a folder of carried-in files; a family is built from whatever it holds."""
    lines = [f"The lighthouse keeper number {i} counted the passing ships with care." for i in range(400)]
    (tmp_path / "novels.txt").write_text("".join(f"{line}\n" for line in lines))
    monkeypatch.setenv("ZIGZAG_HAYSTACKS", str(tmp_path))
    assert haystacks.sentences("novels") == tuple(lines)
    (sample,) = generate_task("niah_single_1", tok, 1024, 1, seed=0, haystack="novels")
    assert "lighthouse keeper" in sample.context and "The grass is green." not in sample.context


def test_fetch_is_idempotent(tmp_path, monkeypatch):
    """With both files present, fetch downloads nothing."""
    for family in ("novels", "manuals"):
        (tmp_path / "haystacks").mkdir(exist_ok=True)
        (tmp_path / "haystacks" / f"{family}.txt").write_text("A sentence.\n")

    def no_download(*args, **kwargs):
        raise AssertionError("fetch downloaded although the files are there")

    monkeypatch.setattr(haystacks, "_download", no_download)
    paths = haystacks.fetch(tmp_path)
    assert paths == {f: tmp_path / "haystacks" / f"{f}.txt" for f in ("novels", "manuals")}


def test_bad_family(tok):
    with pytest.raises(ValueError, match="haystack must be"):
        generate_task("niah_single_1", tok, 1024, 1, seed=0, haystack="poems")
    with pytest.raises(ValueError, match="haystack must be"):
        haystacks.sentences("poems")


# --- the readers, on small inputs -------------------------------------------------------------


def test_split_sentences():
    text = '"My dear Mr. Bennet," said his lady. "Have you heard?" Lord! how odd. J. Smith (e.g. a pipe) ends. Done.'
    assert split_sentences(text) == [
        '"My dear Mr. Bennet," said his lady.',
        '"Have you heard?"',
        "Lord! how odd.",
        "J. Smith (e.g. a pipe) ends.",
        "Done.",
    ]


def test_novel_sentences_drop_front_matter_and_headings():
    lines = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "", "", "Emma Woodhouse, handsome,"]
    lines += ["clever, and _rich_.  She was happy.", "", "THE END", "", "Chapter 2", "", "Mr. Knightley came."]
    assert novel_sentences(lines) == [
        "Emma Woodhouse, handsome, clever, and rich.",
        "She was happy.",
        "Mr. Knightley came.",
    ]


def test_groff_sentences():
    page = r""".\" a comment
.TH pipe 7 2022-12-04 "Linux man-pages 6.03"
.SH NAME
pipe \- overview of pipes and FIFOs
.SH SYNOPSIS
.nf
.B #include <unistd.h>
.fi
.SH DESCRIPTION
A pipe is created using
.BR pipe (2),
which returns two file descriptors\(emone for each end.
The \fIread end\fP is opened with the
.B O_RDONLY
flag.
.TP
.B EPIPE
The read end of the pipe has been closed by every reader.
.PP
.EX
int fd[2]; pipe(fd);
.EE
Call it as x = read(fd, buf, n); in a loop.
See
.UR https://example.org
the full manual
.UE .
.SH SEE ALSO
.BR fifo (7)
"""
    assert groff_sentences(page) == [
        "A pipe is created using pipe(2), which returns two file descriptors\u2014one for each end.",
        "The read end is opened with the O_RDONLY flag.",
        "The read end of the pipe has been closed by every reader.",
        "See the full manual.",
    ]


def _r_int(x: int) -> bytes:
    return struct.pack(">i", x)


def _r_string(s: str) -> bytes:
    data = s.encode()
    return _r_int(9 | (1 << 12)) + _r_int(len(data)) + data  # CHARSXP, UTF-8 flag in the levels


def _r_named(kind: int, items: list[bytes], names: list[str]) -> bytes:
    """A vector of ``kind`` (16 character, 19 list) with a names attribute, in R's XDR format."""
    body = _r_int(kind | (1 << 9)) + _r_int(len(items)) + b"".join(items)
    names_attr = _r_int(2 | (1 << 10)) + _r_int(1) + _r_string("names")  # pairlist node, tag: symbol
    names_attr += _r_int(16) + _r_int(len(names)) + b"".join(_r_string(n) for n in names) + _r_int(254)
    return body + names_attr


def _r_serialize(obj: bytes) -> bytes:
    return b"X\n" + _r_int(3) + _r_int(0x040201) + _r_int(0x030500) + _r_int(5) + b"UTF-8" + obj


def test_read_rdb(tmp_path):
    """A lazy-load database as R writes it: zlib blocks in .rdb, a gzipped index in .rdx."""
    books = {"emma": ["EMMA", "", "It began.", None], "persuasion": ["Sir Walter Elliot."]}
    db, variables = b"", []
    for lines in books.values():
        vector = (
            _r_int(16)
            + _r_int(len(lines))
            + b"".join(_r_string(x) if x is not None else _r_int(9) + _r_int(-1) for x in lines)
        )
        raw = _r_serialize(vector)
        block = _r_int(len(raw)) + zlib.compress(raw)
        variables.append(_r_int(13) + _r_int(2) + _r_int(len(db)) + _r_int(len(block)))
        db += block
    index = _r_named(
        19,
        [_r_named(19, variables, list(books)), _r_named(19, [], []), _r_int(10) + _r_int(1) + _r_int(1)],
        ["variables", "references", "compressed"],
    )
    (tmp_path / "Rdata.rdb").write_bytes(db)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_r_serialize(index)))
    assert haystacks.read_rdb(tmp_path / "Rdata.rdx") == books


def test_real_novels():
    units = _sentences("novels")
    assert units[0] == "The family of Dashwood had long been settled in Sussex."  # Sense and Sensibility
    assert (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."
        in units
    )
    assert not any(re.match(r"(?i)chapter\b", u) for u in units)


def test_real_manuals():
    units = _sentences("manuals")
    assert not any("\\" in u or u.startswith((".", "'")) or "#include" in u for u in units)  # markup, code
    assert len(set(units)) == len(units)
    assert any("pipe" in u for u in units)
