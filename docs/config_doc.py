"""docs/config.md from the config dataclasses' field comments: `python docs/config_doc.py` writes it,
`python docs/config_doc.py --check` fails when a field has no comment or the file is stale (tests/test_docs.py).

A field's documentation is the block of comment lines directly above it plus its trailing comment; the default is
read from the dataclass itself. Per-method (peers.NAME.<method>) and per-backend (data.<backend>) sub-sections are
the schema's SECTION fields, listed after their parent's keys.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path

OUT = Path(__file__).with_name("config.md")


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment text} from the source of the class that declares the fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    lines = inspect.getsource(cls).splitlines()
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        name = stripped.split(":", 1)[0].strip()
        if stripped and ":" in stripped and name.isidentifier() and name in names:
            trailing = _trailing_comment(line)
            out[name] = " ".join(above + ([trailing] if trailing else []))
        above = []
    return out


def _trailing_comment(line: str) -> str:
    for tok in tokenize.generate_tokens(io.StringIO(line + "\n").readline):
        if tok.type == tokenize.COMMENT:
            return tok.string.lstrip("#").strip()
    return ""


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value) or (isinstance(value, dict) and value and
                                           all(dataclasses.is_dataclass(v) for v in value.values())):
        return ""
    return f"`{value!r}`" if value not in ("", None) else ("`''`" if value == "" else "`null`")


def rows(cls: type, prefix: str, missing: list[str]) -> list[tuple[str, str, str]]:
    """(key, default, text) for every field of `cls` under `prefix`, sub-sections after their parent's keys."""
    comments = field_comments(cls)
    out, sections = [], []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        sub = _section_type(cls, f)
        if sub is not None:
            named = sub is not _hints(cls).get(f.name)  # a mapping of name -> settings (peers, views)
            sections.append((sub, key + (".NAME." if named else ".")))
            if f.name not in comments and not named:
                continue  # a registry's sub-section: its keys say it all
        text = comments.get(f.name, "")
        if sub is None and not text:
            missing.append(key)
        if sub is None or (text and sub is not _hints(cls).get(f.name)):  # a commented mapping: its own row too
            out.append((key, _default(f), text))
    for sub, sub_prefix in sections:
        out.extend(rows(sub, sub_prefix, missing))
    return out


def _section_type(cls: type, f: dataclasses.Field) -> type | None:
    hints = _hints(cls)
    t = hints.get(f.name)
    if dataclasses.is_dataclass(t):
        return t
    args = typing.get_args(t)
    if typing.get_origin(t) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1]  # a mapping of name -> settings: its entries' keys under NAME
    return None


def _hints(cls: type) -> dict:
    import typing
    module = sys.modules[cls.__module__]
    try:
        return typing.get_type_hints(cls, vars(module))
    except Exception:
        return {}


def render() -> tuple[str, list[str]]:
    from dogo.engine.config import Config
    missing: list[str] = []
    table = rows(Config, "", missing)
    lines = ["# Configuration keys", "",
             "Every key of a dogo config, its default and what it does; generated from the comments of the config "
             "dataclasses (`engine/config/schema.py`, with the methods' and the backends' own settings) by "
             "`python docs/config_doc.py` (`make docs`); do not edit by hand. A config "
             "file sets any of them in YAML; `key=value` on the command line overrides it (see the README's "
             "Configuration). `auto` values are settled once when the config is loaded, and the run's "
             "`config.yaml` records what they became.", "",
             "| key | default | what it does |", "| --- | --- | --- |"]
    for key, default, text in table:
        lines.append(f"| `{key}` | {default} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n", missing


def main(argv: list[str]) -> int:
    text, missing = render()
    if missing:
        print("config fields without a comment: " + ", ".join(missing), file=sys.stderr)
        return 1
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python docs/config_doc.py (make docs)", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
