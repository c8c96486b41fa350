"""Typed, strict configuration, the bottom floor of the engine: it imports nothing of dogo's above dogo.core.

- schema.py: one dataclass per section (the types, defaults and their documentation: docs/config.md);
- loading.py: YAML files (`base:`), `key=value` overrides and stored configs into the schema, and back to YAML;
- migrate.py: keys and values that moved since a config was written;
- resolve.py: every `auto` and every default that depends on other keys, settled once for this machine;
- checks.py: what single types cannot express.

`load` (a file) and `from_dict` (a checkpoint's config) are the two ways in; both resolve and check, so that every
command refuses the same mistakes. The resolved config is what a run writes beside its results and stores in its
checkpoints; everything downstream reads its resolved values and none resolves them again.
"""
from __future__ import annotations

from pathlib import Path

from dogo.engine.config.checks import check
from dogo.engine.config.loading import (MACHINE_KEYS, apply_override, build, build_file, build_stored, dump,
                                        dump_text, schema_keys, to_dict)
from dogo.engine.config.resolve import (follow_method_switch, knn_protocol_name, require_resolved, resolve,
                                        resolve_device, resolved_for, unresolved)
from dogo.engine.config.schema import (KNN_PROTOCOLS, AugmentConfig, CheckpointConfig, Config, DataConfig,
                                       DistributedConfig, EvalConfig, LogConfig, ObjectiveConfig, OptimConfig,
                                       PeerConfig, PrecisionConfig, ScheduleConfig, TeacherConfig)


def load(path: str | Path | None, overrides: list[str] = (), notes: list[str] | None = None) -> Config:
    """Load a YAML config (None: the defaults), apply overrides, resolve every `auto` for this machine and check
    the whole for consistency. notes: what the loading decided for the user to know (a method switched by an
    override takes that method's head), appended as lines."""
    cfg = build_file(path, overrides)
    if overrides:
        said = follow_method_switch(build_file(path), cfg, overrides)
        if notes is not None:
            notes.extend(said)
    cfg = resolve(cfg)
    check(cfg)
    return cfg


def from_dict(raw: dict, overrides: list[str] = ()) -> Config:
    """A stored config (a checkpoint's) to use on this machine: its machine keys (device, precision, ...:
    loading.MACHINE_KEYS) resolved again here, `overrides` applied, then resolved and checked as a loaded one is
    (what `dogo eval` and `dogo export` run with)."""
    cfg = resolve(build_stored(raw, overrides, this_machine=True))
    check(cfg)
    return cfg


def stored(raw: dict) -> Config:
    """A stored config as it was written, in today's layout (moved keys moved): what a run resumed or a teacher
    read from a checkpoint recorded, not checked against this machine."""
    return resolve(build_stored(raw))


__all__ = ["KNN_PROTOCOLS", "MACHINE_KEYS", "AugmentConfig", "CheckpointConfig", "Config", "DataConfig",
           "DistributedConfig", "EvalConfig", "LogConfig", "ObjectiveConfig", "OptimConfig", "PeerConfig",
           "PrecisionConfig", "ScheduleConfig", "TeacherConfig", "apply_override", "build", "check", "dump",
           "dump_text", "from_dict", "knn_protocol_name", "load", "require_resolved", "resolve", "resolve_device",
           "resolved_for", "schema_keys", "stored", "to_dict", "unresolved"]
