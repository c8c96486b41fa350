"""The `dogo` command: one module per subcommand in dogo/commands/ (its parser, its help and its handler, which calls
the engine and prints); this file puts them under one parser and turns every error a user can cause into one line
and exit code 2."""
from __future__ import annotations

import argparse
import sys
import warnings

from dogo.commands import COMMANDS
from dogo.commands.args import Parser, say
from dogo.core.errors import CheckpointError, ConfigError, DataError
from dogo.plots import PlotError


def parser() -> Parser:
    p = Parser(prog="dogo", description="Self-supervised distillation trainer (DoGo, DisCo, SimCLR, ...). Every "
                                        "config key: docs/config.md; every command: docs/commands.md.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: the file, what went wrong, and what to do."""
    import errno
    where = exc.filename if exc.filename is not None else "a file"
    what = exc.strerror or str(exc)
    advice = {
        errno.ENOSPC: "the disk is full: free space, then run the same command again (a training run resumes from "
                      "its newest checkpoint)",
        errno.EFBIG: "the file is over a size limit (ulimit -f): raise it or write elsewhere",
        errno.EDQUOT: "the disk quota is used up: free space, then run the same command again",
        errno.EACCES: "it cannot be written here: choose another path (out_dir=..., or another destination)",
        errno.EROFS: "the file system is read-only: choose another path (out_dir=..., or another destination)",
        errno.ENOTDIR: "a file stands where a folder is needed: choose another path (out_dir=...)",
        errno.EEXIST: "a file stands where a folder is needed: choose another path (out_dir=...)",
        errno.EISDIR: "a folder stands where a file is needed: give a file name",
    }.get(exc.errno, "check the path and the disk")
    return f"{where}: {what}; {advice}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; key=value overrides may also follow the options (dogo train C.yaml --dry-run a.b=1)."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    warnings.filterwarnings("once", category=UserWarning)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, PlotError) as exc:
        say(f"error: {exc}")  # one line, however long
        return 2
    except OSError as exc:  # a full disk, a path that is a file, a folder that cannot be written: the file and why
        say(f"error: {os_error_line(exc)}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling (e.g. while numba compiles at import)
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
