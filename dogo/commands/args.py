"""What every command shares at its edge: the parser class whose errors are one line, the argument types that
refuse bad numbers there (before anything loads), and the console the commands print to."""
from __future__ import annotations

import argparse
import math
import sys

from rich.console import Console

console = Console(soft_wrap=True)  # a line as wide as its content, also in a log file or a pipe


def say(text: str) -> None:
    """One line (or several) to the user, without rich's markup and highlighting."""
    console.print(text, highlight=False, markup=False)


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line naming the command and the fix, exit 2."""

    def error(self, message: str):
        sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _argument_type(convert, kind: str, check):
    """An argparse type: `convert(text)` (a ValueError: not a `kind`), then `check(value)`, which returns what is
    wrong with it or None."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value
    parse.__name__ = kind  # what argparse names in its own messages
    return parse


def count(minimum: int = 1):
    """An argument type: an integer of at least `minimum`."""
    return _argument_type(int, "an integer", lambda v: f"must be at least {minimum}" if v < minimum else None)


def number(minimum: float = 0.0, inclusive: bool = False, maximum: float | None = None):
    """An argument type: a finite number above `minimum` (at least it, with inclusive), at most `maximum`."""
    def check(value: float) -> str | None:
        if not math.isfinite(value):
            return "must be a finite number"
        if value < minimum or (value == minimum and not inclusive):
            return f"must be {'at least' if inclusive else 'more than'} {minimum:g}"
        if maximum is not None and value > maximum:
            return f"must be at most {maximum:g}"
        return None
    return _argument_type(float, "a number", check)
