"""What every benchmark command line shares: a help formatter that shows each option's default and
keeps the module docstring's layout (its usage examples) as written."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` lists every option with its default, and prints the description verbatim."""
