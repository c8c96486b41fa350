"""The layout's promises: no import circle among dogo's modules (imports inside functions counted too), the engine
free of DALI and FFCV, one home for the rules that were once copied, and a run's config with nothing left `auto`."""
import ast
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

PACKAGES = {"core": "dogo.core", "engine": "dogo.engine", "pipelines": "dogo.pipelines", "models": "dogo.models",
            "dogo": "dogo", "benchmarks": "dogo.benchmarks"}

# The floors, bottom first (docs/architecture.md): a module imports from floors below its own, or from its own
# package; packages that share a floor do not import each other.
LAYERS = [("dogo.core",), ("dogo.engine.config",), ("dogo.engine.dist", "dogo.models", "dogo.pipelines"),
          ("dogo.engine.ssl",), ("dogo.engine.eval",), ("dogo.engine.run",), ("dogo.benchmarks",),
          ("dogo",)]  # the command layer: dogo/ (cli.py, commands/, plots.py), whatever the floors below do not hold


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The dogo modules `path` imports anywhere in it (a `from package import name` of a submodule counts as the
    submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(node.module)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or with a self-import (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name.rpartition(".")[0]} for name, path in modules.items()}
    assert len(graph) > 60
    assert _cycles(graph) == []


def _floor(module: str) -> tuple[int, str]:
    """(floor, the package on it that holds `module`)."""
    for floor, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or module.startswith(package + "."):
                return floor, package
    raise AssertionError(f"{module} is on no floor of LAYERS")


def test_every_import_goes_down_a_floor_or_stays_in_its_package():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        if name == "dogo.engine":  # a namespace (an empty __init__ file)
            continue
        floor, package = _floor(name)
        for imported in _imports(path, modules) - {"dogo.engine"}:
            other_floor, other_package = _floor(imported)
            if other_floor > floor or (other_floor == floor and other_package != package):
                wrong.append(f"{name} -> {imported}")
    assert wrong == []


def test_the_floor_check_sees_an_upward_import():
    assert _floor("dogo.engine.config.schema") < _floor("dogo.engine.ssl.methods")
    assert _floor("dogo.pipelines.base")[0] == _floor("dogo.models.heads")[0]


def test_no_block_of_four_lines_is_repeated_in_the_command_layer():
    """The command layer parses, calls the engine and prints: anything it would repeat belongs in a helper. Lines
    count as the same when only their strings and numbers differ."""
    import re
    shape = re.compile(r"""[rbf]*("[^"]*"|'[^']*')|\b\d+(\.\d+)?\b""")
    files = [REPO / "dogo" / "cli.py", *sorted((REPO / "dogo" / "commands").glob("*.py"))]
    seen: dict[tuple[str, ...], str] = {}
    repeated = []
    for path in files:
        lines = [shape.sub("S", line.strip()) for line in path.read_text().splitlines()]
        code = [(i, line) for i, line in enumerate(lines, 1) if line and not line.startswith(("#", '"', "'"))]
        for k in range(len(code) - 3):
            block = tuple(line for _, line in code[k:k + 4])
            if any(len(line) < 12 for line in block):  # "return 0", "else:": too short to be a copy
                continue
            where = f"{path.name}:{code[k][0]}"
            if block in seen:
                repeated.append(f"{seen[block]} = {where}")
            seen.setdefault(block, where)
    assert repeated == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_engine_never_imports_dali_or_ffcv():
    for path in (REPO / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("ffcv", "nvidia") for n in names), path


@pytest.mark.parametrize("needle, home", [
    ("difflib", "core/errors.py"),  # the did-you-mean suggestion
    ("torch.channels_last if", "core/precision.py"),  # the memory-format rule
    ("enabled=dt != torch.float32", None),  # autocast's rule lives in Precision.autocast
    ("/proc/meminfo", "core/environment.py"),
    ("/proc/self/status", "core/environment.py"),
    ("def open_eval_split", "pipelines/"),  # once per backend with evaluation images of its own, and the dispatcher
])
def test_one_home_for_each_rule(needle, home):
    where = [str(p.relative_to(REPO)) for folder in PACKAGES for p in (REPO / folder).rglob("*.py")
             if needle in p.read_text()]
    assert all(home and w.startswith(home) for w in where), where


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                                           if not p.name.startswith("study_")))  # study files name training configs
def test_a_runs_config_holds_no_auto(config, tmp_path, shapes):
    """What a run writes as config.yaml: every `auto` settled for this machine; and it loads back to itself."""
    from dogo.engine import config as config_mod
    text = (REPO / "configs" / config).read_text()
    data = [f"data.path={shapes}"] if "image_size: auto" in text else []  # auto reads the images: some must exist
    cfg = config_mod.load(REPO / "configs" / config, data)
    config_mod.dump(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    written = yaml.safe_load(text)

    def walk(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else k)
        else:
            assert node != "auto", f"{config}: {key} is still auto in the run's config.yaml"
    walk(written, "")
    assert config_mod.load(tmp_path / "config.yaml") == cfg


def test_the_trainer_takes_only_a_resolved_config():
    from dogo.engine.config import Config
    from dogo.engine.run.trainer import Trainer
    with pytest.raises(ValueError, match="not resolved .*device.*still auto"):
        Trainer(Config())
