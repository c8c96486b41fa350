"""The error types a user sees (each message names the key or file and what to do) and the did-you-mean helpers.

This module imports nothing of dogo's, so that every other module may import it without an import circle.
"""
from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message says which and what to do."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, read or resumed from; the message names the file."""


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names the path and what to do."""


def close_names(name: str, valid: list[str], n: int = 1, cutoff: float = 0.4) -> list[str]:
    """The `n` valid names nearest to `name` (difflib's ratio of at least `cutoff`), nearest first."""
    return difflib.get_close_matches(str(name), valid, n=n, cutoff=cutoff)


def suggest(name: str, valid: list[str], noun: str = "valid keys") -> str:
    """'; did you mean X?' for the nearest valid name, else the list of all of them."""
    near = close_names(name, valid)
    return f"; did you mean '{near[0]}'?" if near else f"; {noun}: {', '.join(valid)}"
