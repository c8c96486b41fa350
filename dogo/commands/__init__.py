"""The subcommands of `dogo`, one module each: `add(sub)` adds its parser (with its help) and its handler."""
from dogo.commands import bench, config, convert, eval, export, plot, study, train

COMMANDS = (train, config, eval, export, convert, plot, bench, study)
