"""dogo config: the resolved config a run would use, printed as YAML, without training."""
from __future__ import annotations

from dogo.commands.args import say

HELP = "print the resolved config (every key, every auto settled) without training"
DESCRIPTION = (
    "loads CONFIG with the overrides exactly as `dogo train` does (base: files, checks, every `auto` settled for "
    "this machine) and prints the result as YAML: what the run's config.yaml would hold. What each key does: "
    "docs/config.md")


def add(sub) -> None:
    c = sub.add_parser("config", help=HELP, description=DESCRIPTION)
    c.add_argument("config", help="YAML file, e.g. configs/folder_small.yaml")
    c.add_argument("overrides", nargs="*", help="dotted.key=value, as for dogo train")
    c.set_defaults(func=run)


def run(args) -> int:
    from dogo.engine import config as config_mod
    notes: list[str] = []
    text = config_mod.dump_text(config_mod.load(args.config, args.overrides, notes)).rstrip()
    say("\n".join([*(f"# note: {note}" for note in notes), text]))
    return 0
