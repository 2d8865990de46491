"""Command-line conventions of this project's scripts (training/mnist.py,
benchmarks/*.py, cloud/tpu.py): every error is one line on stderr,
`PROG: error: MESSAGE`; bad arguments exit with status 2.

Standard library only: cloud/tpu.py imports it and runs without the project's
dependencies.
"""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def error(prog: str, message: object) -> None:
    """Print `PROG: error: MESSAGE` on one line of stderr."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its type's name if it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
