"""Reading a config: YAML files (with `base:`), `key=value` overrides and stored configs (a checkpoint's) into the
schema's dataclasses, with every key and value checked against its type; and writing one back as YAML.

A config file is user input: it is read as UTF-8 (at most MAX_FILE_BYTES), a key may appear once per mapping,
YAML aliases may not expand it beyond MAX_VALUES values, and a `base:` chain is at most MAX_BASE_DEPTH files deep.
Every error names the offending key (and the file or override it came from) and, for a misspelt key, the nearest
valid one in any section.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dogo.core.errors import ConfigError, close_names, suggest
from dogo.core.io import atomic_write_text
from dogo.engine.config.migrate import migrate_stored, moved_key, rename_values
from dogo.engine.config.schema import KNN_PROTOCOLS, Config, section_names

MAX_FILE_BYTES = 1 << 20  # a config is a page of YAML; a larger file is not one
MAX_VALUES = 100_000  # values a document may expand to through aliases (a YAML alias bomb expands to billions)
MAX_BASE_DEPTH = 64  # files in a base: chain

# What other tools call our keys: the last part of an unknown key -> ours (for did-you-mean)
SYNONYMS = {"learning_rate": "lr", "base_lr": "lr", "wd": "weight_decay", "num_workers": "workers",
            "max_epochs": "epochs", "n_epochs": "epochs", "temperature": "tau", "bs": "batch_size",
            "batch": "batch_size", "warmup": "warmup_epochs", "size": "image_size", "crop_size": "image_size",
            "arch_name": "arch", "backbone": "arch", "method": "ssl", "output_dir": "out_dir", "run_name": "name"}


# -- YAML --------------------------------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (the last one would silently win)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigError(f"line {line}: key '{key}' appears twice in one mapping (also on line "
                                          f"{seen[key]}); keep one")
                    seen[key] = line
                except TypeError:  # an unhashable key: the constructor's own error says so
                    pass
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, memo: dict[int, int]) -> int:
    """Values the node stands for once every alias is expanded (an alias shares its anchor's node)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    memo[id(node)] = 1  # a recursive alias counts once while its own size is being added up
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    size = min(size, MAX_VALUES + 1)  # enough to refuse; keeps the arithmetic small
    memo[id(node)] = size
    return size


def parse_yaml(text: str, where: str) -> Any:
    """One YAML document, strictly (duplicate keys refused, alias expansion bounded); `where` names it in errors."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_VALUES:
            raise ConfigError(f"{where}: expands to more than {MAX_VALUES:,} values through YAML aliases "
                              f"(&anchor / *alias); a config needs far fewer: write it out")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if not str(exc).startswith(where) else str(exc)) from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply for a config") from None
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    """A config file's text: UTF-8 (a byte-order mark allowed), not larger than a config can be."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"config file {path} is {size:,} bytes, more than a config's {MAX_FILE_BYTES:,}: is it the "
                          f"right file?")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"config file {path} is UTF-16 text (a Windows editor's 'Unicode'); save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8, or check that it is a config file") from None


def read_yaml(path: Path) -> dict:
    """A config file as a dict, with its `base:` chain (each a path relative to the file naming it) read first and
    overlaid: mappings merge key by key, except `peers` and `views`, which a file that sets them replaces whole (its
    peers are the run's peers, its plan of views the run's plan)."""
    chain: list[Path] = []
    layers: list[dict] = []
    while True:
        if not path.is_file():
            where = f" (the base of {chain[-1]})" if chain else ""
            raise ConfigError(f"config file {path}{where} does not exist; the shipped ones are in configs/")
        if path.resolve() in [p.resolve() for p in chain]:
            raise ConfigError(f"{path}: its base: chain comes back to itself ({' -> '.join(map(str, (*chain, path)))})")
        if len(chain) == MAX_BASE_DEPTH:
            raise ConfigError(f"{chain[0]}: its base: chain is more than {MAX_BASE_DEPTH} files deep; shorten it")
        raw = parse_yaml(_read_text(path), str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        chain.append(path)
        base = raw.pop("base", None)
        layers.append(raw)
        if base is None:
            break
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: expected the path of another config file, got {base!r}")
        path = path.parent / base
    merged: dict = {}
    for layer in reversed(layers):
        merged = _overlay(merged, layer)
    return merged


WHOLE = ("peers", "views")  # top-level mappings a file states whole: a base file's entries are not kept beside them


def _overlay(base: dict, top: dict, key: str = "") -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not (key == "" and k in WHOLE):
            out[k] = _overlay(out[k], v, f"{key}.{k}" if key else k)
        else:
            out[k] = v
    return out


# -- building the dataclasses ----------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def schema_keys(cls: type = Config, prefix: str = "", peer: str = "NAME") -> list[str]:
    """Every dotted key of the schema (peers' keys under peers.<peer>., the entries of other mappings of settings
    under NAME: views.NAME.count, views.NAME.view_recipe.NAME.blur_p)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        entry = _entry_type(tp)
        if dataclasses.is_dataclass(tp):
            out.extend(schema_keys(tp, key + ".", peer))
        elif entry is not None:
            name = peer if f.name == "peers" and cls is Config else "NAME"
            out.extend(schema_keys(entry, f"{key}.{name}.", peer))
        else:
            out.append(key)
    return out


def _entry_type(tp: Any) -> type | None:
    """The settings type of a mapping of name -> settings (peers, views), else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1]
    return None


def unknown_key(cls: type, key: str, full: str) -> ConfigError:
    """The error for a key `cls` does not have: where it moved, else the nearest valid key in any section (the
    same name elsewhere, a name other tools use for ours, then the closest spelling)."""
    moved = moved_key(cls.__name__, key)
    if moved:
        new = full[: len(full) - len(key)] + moved
        return ConfigError(f"'{full}' has moved into its method's or backend's own section: write '{new}'")
    parts = full.split(".")
    peer = parts[1] if parts[0] == "peers" and len(parts) > 2 else "NAME"
    everywhere = schema_keys(peer=peer)
    leaf = SYNONYMS.get(key, key)
    same_name = [k for k in everywhere if k.rsplit(".", 1)[-1] == leaf]
    siblings = [f.name for f in dataclasses.fields(cls)]
    if not same_name:
        near_sibling = close_names(str(key), siblings, cutoff=0.6)
        if near_sibling:
            same_name = [full[: len(full) - len(key)] + near_sibling[0]]
    if not same_name:
        leaves = {k.rsplit(".", 1)[-1]: k for k in everywhere}
        same_name = [leaves[n] for n in close_names(str(key), list(leaves), cutoff=0.6)]
    if same_name:
        first, *others = sorted(same_name, key=lambda k: (k.count("."), k))
        also = f" (or {', '.join(repr(o) for o in others[:3])})" if others else ""
        return ConfigError(f"unknown key '{full}'; did you mean '{first}'{also}?")
    return ConfigError(f"unknown key '{full}'" + suggest(str(key), siblings)
                       + "; every key: docs/config.md, or dogo config CONFIG")


def _coerce(value: Any, tp: Any, key: str, may_be_empty: bool = False) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`. may_be_empty: a mapping of name -> settings
    may have no entry (the schema field's MAY_BE_EMPTY)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:  # the first type that takes the value (e.g. 'auto' or an integer)
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc).split(": ", 1)[-1])
        raise ConfigError(f"{key}: " + "; or ".join(errors))
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return build(tp, value, prefix=key)
    if origin is dict and args[1] is Any:  # free-form arguments (timm.create_model's), passed on as given
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping of argument names to values, got {value!r}")
        return dict(value)
    if origin is dict:
        if not isinstance(value, dict) or not (value or may_be_empty):
            raise ConfigError(f"{key}: expected a non-empty mapping of name -> settings, got {value!r}")
        return {str(k): _coerce(v or {}, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string: a number was meant
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def build(cls: type, raw: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with the nearest valid one."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise unknown_key(cls, str(key), full)
        kwargs[key] = _coerce(value, hints[key], full, _may_be_empty(cls, key))
    return cls(**kwargs)


def _may_be_empty(cls: type, name: str) -> bool:
    return any(f.name == name and f.metadata.get("may_be_empty") for f in dataclasses.fields(cls))


def apply_override(cfg: Config, override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (0.3, true, [1, 2], null). A
    mapping given for a section sets those keys of it and keeps the rest (`optim={lr: 0.5}`); given for `peers`,
    it is the run's peers, as in a file."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key=value (e.g. optim.lr=0.6)")
    path, text = override.split("=", 1)
    path = path.strip()
    value = parse_yaml(text, f"override '{override}'")
    parts = path.split(".")
    if not all(parts):
        raise ConfigError(f"override '{override}': '{path}' is not a dotted key (e.g. optim.lr=0.6)")
    node: Any = cfg
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[:depth + 1]), override)
    _set(node, parts[-1], value, path, override)


def _child(node: Any, part: str, dotted: str, override: str) -> Any:
    if isinstance(node, dict):
        if part not in node:
            done = dotted.rpartition(".")[0]
            raise ConfigError(f"override '{override}': no entry '{part}' under '{done}'" + suggest(part, list(node)))
        return node[part]
    if part not in typing.get_type_hints(type(node)):
        raise ConfigError(f"override '{override}': {unknown_key(type(node), part, dotted)}")
    return getattr(node, part)


def _set(node: Any, part: str, value: Any, path: str, override: str) -> None:
    """Set `part` of `node` to `value`; a mapping for a section merges into it key by key."""
    if isinstance(node, dict):
        current = _child(node, part, path, override)
        tp = type(current)
    else:
        hints = typing.get_type_hints(type(node))
        if part not in hints:
            raise ConfigError(f"override '{override}': {unknown_key(type(node), part, path)}")
        tp, current = hints[part], getattr(node, part)
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
        for key, sub in value.items():
            _set(current, str(key), sub, f"{path}.{key}", override)
        return
    coerced = _coerce(value, tp, path, not isinstance(node, dict) and _may_be_empty(type(node), part))
    if isinstance(node, dict):
        node[part] = coerced
    else:
        setattr(node, part, coerced)


# -- the two ways in (engine/config/__init__.py resolves and checks what they build) -----------------------------

def build_file(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """A YAML config (None: the defaults) with `overrides` applied, not yet resolved."""
    raw = read_yaml(Path(path)) if path is not None else {}
    rename_values(raw)
    try:
        cfg = build(Config, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    for override in overrides:
        apply_override(cfg, override)
    return cfg


# What a run resolved for the machine it ran on; evaluating its checkpoint elsewhere resolves them again there.
MACHINE_KEYS = ("device", "distributed.backend", "precision.dtype", "precision.channels_last",
                "precision.cuda_graphs", "augment.place", "objective.tile", "log.progress", "log.tensorboard")


def build_stored(raw: dict, overrides: list[str] = (), this_machine: bool = False) -> Config:
    """A stored config (a checkpoint's) in today's layout with `overrides` applied, not yet resolved.
    this_machine: the MACHINE_KEYS go back to auto (a GPU run's checkpoint evaluated on a CPU), unless an override
    sets them."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the stored config is a {type(raw).__name__}, not a mapping of sections")
    raw = migrate_stored(plain(raw), KNN_PROTOCOLS)
    cfg = build(Config, raw)
    if this_machine:
        for key in MACHINE_KEYS:
            node, _, leaf = key.rpartition(".")
            setattr(_at(cfg, node), leaf, "auto")
    for override in overrides:
        apply_override(cfg, override)
    # a preset's k and T are resolve's to fill in (the stored ones came from the stored preset); only values given
    # on this command line stay, to be checked against the preset
    keys = {o.partition("=")[0].strip() for o in overrides}
    if cfg.eval.knn_protocol != "custom":
        for key in ("knn_k", "knn_temperature"):
            if f"eval.{key}" not in keys:
                setattr(cfg.eval, key, None)
    return cfg


def _at(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in filter(None, dotted.split(".")):
        node = getattr(node, part)
    return node


# -- writing ---------------------------------------------------------------------------------------------------

def to_dict(cfg: Config, all_sections: bool = False) -> dict:
    """The config as plain dicts; a peer keeps only its own method's sub-section, the data only its backend's and
    the views' recipe overrides only the numbers they set (unless all_sections)."""
    out = dataclasses.asdict(cfg)
    if not all_sections:
        for name, peer in out["peers"].items():
            for section in section_names(type(cfg.peers[name])):
                if section != peer["ssl"]:
                    peer.pop(section, None)
        for section in section_names(type(cfg.data)):
            if section != cfg.data.backend:
                out["data"].pop(section, None)
        for group in out["views"].values():  # an override states only what differs from augment
            group["recipe"] = _set_only(group["recipe"])
            group["view_recipe"] = {k: _set_only(v) for k, v in group["view_recipe"].items()}
    return out


def _set_only(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if v is not None}


def dump_text(cfg: Config) -> str:
    """The resolved config as YAML (tuples as lists so that it loads back)."""
    return yaml.safe_dump(plain(to_dict(cfg)), sort_keys=False)


def dump(cfg: Config, path: Path) -> None:
    atomic_write_text(path, dump_text(cfg))


def plain(obj: Any) -> Any:
    """Dicts and lists all the way down (tuples as lists), copied."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj
