"""Every command line in benchmarks/ and examples/ documents each of its options: a non-empty help
text, and the default shown in --help (ArgumentDefaultsHelpFormatter, or %(default)s in the help)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Every file that builds a parser, found by its source, so that a new command line is checked too.
CLI_FILES = sorted(
    p.relative_to(ROOT)
    for folder in ("benchmarks", "examples")
    for p in (ROOT / folder).rglob("*.py")
    if "ArgumentParser(" in p.read_text()
)


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def _load(rel: Path):
    if rel.parts[0] == "benchmarks":
        return importlib.import_module(".".join(rel.with_suffix("").parts))
    spec = importlib.util.spec_from_file_location(f"_cli_{rel.stem}", ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parser_of(rel: Path, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``main`` builds: parse_args is stopped before it reads any argument."""
    module = _load(rel)

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    main = module.main
    with pytest.raises(_Captured) as got:
        main([]) if inspect.signature(main).parameters else main()
    return got.value.parser


def test_the_command_lines_are_found():
    names = {str(p) for p in CLI_FILES}
    for expected in ("benchmarks/ruler/run.py", "benchmarks/ruler/report.py", "benchmarks/ruler/pick.py",
                     "benchmarks/ruler/sanity.py", "benchmarks/perf/run.py", "benchmarks/perf/profile.py",
                     "benchmarks/merge_bench.py", "examples/needle_demo.py"):
        assert expected in names, names


@pytest.mark.parametrize("rel", CLI_FILES, ids=str)
def test_every_option_has_help_and_a_shown_default(rel, monkeypatch):
    parser = _parser_of(rel, monkeypatch)
    shows_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{rel}: {name} has no help text"
        if action.option_strings:
            assert shows_defaults or "%(default)" in action.help, f"{rel}: {name} does not show its default"
    text = parser.format_help()  # also fails on a stray '%' in a help text
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction) and action.default is not argparse.SUPPRESS:
            help_line = parser._get_formatter()._expand_help(action)
            assert "default" in help_line, f"{rel}: {action.option_strings} --help shows no default"
    assert text.strip()
