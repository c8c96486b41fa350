"""The README and docs/: the README's size and order of sections, docs/config.md generated and current, every
repository path, make target and config they name exists, and the SLURM script's syntax and command line."""
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "results" / "README.md"]
SECTIONS = ["Two commands", "Install", "Train", "Evaluate, export, plot", "Data", "Methods", "Configuration",
            "Layout", "Results", "Development"]
TOP = ("benchmarks/", "configs/", "core/", "docs/", "engine/", "pipelines/", "models/", "tests/", "dogo/", ".ci/")
SOURCE = [p for folder in ("core", "engine", "pipelines", "models", "dogo", "benchmarks")
          for p in sorted((REPO / folder).rglob("*.py"))]


def test_readme_is_short_and_in_order():
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024, len(text.encode())
    assert re.findall(r"^## (.+)$", text, flags=re.M) == SECTIONS


def test_result_tables_are_generated_and_current():
    """README's and docs/' result tables say what their result files say (docs/results_tables.py)."""
    proc = subprocess.run([sys.executable, "docs/results_tables.py", "--check"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_drifted_result_table_is_caught(tmp_path, monkeypatch):
    """The check sees a typed number that no longer matches its file."""
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import results_tables
    finally:
        sys.path.pop(0)
    text = (REPO / "README.md").read_text()
    assert results_tables.render(text) == text
    drifted = text.replace("| SimCLR ResNet-18, CIFAR 32 px, 256 images | 12,745", "| SimCLR ResNet-18, CIFAR 32 px, 256 images | 13,745")
    assert drifted != text and results_tables.render(drifted) == text


def test_config_doc_is_generated_and_current():
    proc = subprocess.run([sys.executable, "docs/config_doc.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _named_paths(text: str) -> set[str]:
    """Repository paths in code spans and links: tokens under a top-level folder, or top-level files."""
    tokens = set(re.findall(r"`([^`\s]+)`", text)) | set(re.findall(r"\]\(([^)\s#]+)\)", text))
    for block in re.findall(r"```.*?```", text, flags=re.S):
        tokens |= set(block.split())
    out = set()
    for t in tokens:
        t = t.strip(".,;:()'\"")
        if re.fullmatch(r".+\.py:\w+\.\w+", t):  # file.py:Class.method: the class is what the file defines
            t = t.rsplit(".", 1)[0]
        if "<" in t or "NAME" in t:  # a placeholder (gpu_<device>_<date>, RUN/features_PEER_...)
            continue
        if t.startswith(TOP) or t in ("Makefile", "pyproject.toml"):
            out.add(t)
    return out


def _exists(relative: str, base) -> bool:
    """A path, a glob (*) or a brace list ({a,b}); relative to the repository, or to the document's folder."""
    braces = re.search(r"\{([^}]*)\}", relative)
    if braces:
        return all(_exists(relative[:braces.start()] + alt + relative[braces.end():], base)
                   for alt in braces.group(1).split(","))
    for root in (REPO, base):
        if "*" in relative and list(root.glob(relative)):
            return True
        if (root / relative).exists():
            return True
    return False


def _exists_with_symbol(token: str, base) -> bool:
    """path, or path.py:Name where the file defines Name (a class, a function or a module-level name)."""
    path, _, symbol = token.partition(":")
    if not _exists(path.rstrip("/"), base):
        return False
    if not symbol:
        return True
    text = next((root / path).read_text() for root in (REPO, base) if (root / path).is_file())
    return re.search(rf"^(class|def) {re.escape(symbol)}\b|^{re.escape(symbol)}\b.*=", text, flags=re.M) is not None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_named_in_the_docs_exists(doc):
    text = doc.read_text()
    missing = sorted(p for p in _named_paths(text) if not _exists_with_symbol(p, doc.parent))
    assert not missing, f"{doc.relative_to(REPO)} names paths that do not exist: {missing}"
    targets = set(re.findall(r"^([a-z0-9][a-z0-9-]*):", (REPO / "Makefile").read_text(), flags=re.M))
    code = " ".join(re.findall(r"`([^`]+)`", text) + re.findall(r"```.*?```", text, flags=re.S))
    named = set(re.findall(r"\bmake ([a-z0-9][a-z0-9-]*)", code))
    assert not named - targets, f"{doc.relative_to(REPO)} names make targets that do not exist: {named - targets}"
    configs = {p.name for p in (REPO / "configs").glob("*.yaml")}
    named_configs = set(re.findall(r"\b([a-z0-9_]+\.yaml)\b", text)) - {"config.yaml", "other.yaml"}
    assert not {c for c in named_configs if c.startswith(("cifar10_", "imagenet_", "demo", "disco_", "bench_"))} \
        - configs, f"{doc.relative_to(REPO)} names configs that do not exist"


def test_the_slurm_script_builds_one_torchrun_per_node(tmp_path):
    script = REPO / "docs" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\nprintf "node7\\nnode8\\n"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "args"),
           "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "42",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32"}
    proc = subprocess.run(["bash", str(script), "configs/imagenet_r18_r50.yaml", "data.path=/data/imagenet"],
                          env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().split("\n")[:-1]
    assert args == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", ".venv/bin/python", "-m", "torch.distributed.run",
                    "--nnodes=2", "--nproc-per-node=4", "--rdzv-id=42", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=node7:29500", "-m", "dogo", "train", "configs/imagenet_r18_r50.yaml",
                    "data.workers=7", "data.path=/data/imagenet"]
    missing = subprocess.run(["bash", str(script)], env=env, cwd=REPO, capture_output=True, text=True)
    assert missing.returncode != 0 and "usage: sbatch docs/train.sbatch CONFIG.yaml" in missing.stderr


def test_every_subcommand_is_listed_and_described():
    """docs/commands.md names every dogo subcommand, and each one's --help carries a description of its own."""
    import argparse
    from dogo.cli import parser
    listed = (REPO / "docs" / "commands.md").read_text()

    def walk(p, prefix):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{prefix} {name}")
                return
        yield prefix.strip(), p
    commands = dict(walk(parser(), ""))
    assert len(commands) == 16, sorted(commands)
    descriptions = [sub.description for sub in commands.values()]
    for name, sub in commands.items():
        assert f"dogo {name}" in listed, name
        assert sub.description and len(sub.description) > 80 and descriptions.count(sub.description) == 1, name


def _docstrings(path) -> str:
    """The module's, classes' and functions' docstrings of a source file, joined."""
    import ast
    tree = ast.parse(path.read_text())
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    return "\n".join(filter(None, (ast.get_docstring(n) for n in nodes)))


def _prose() -> list[tuple[str, str]]:
    """(where, text) of every document and every source file's docstrings."""
    return [(str(d.relative_to(REPO)), d.read_text()) for d in DOCS] + \
           [(str(p.relative_to(REPO)), _docstrings(p)) for p in SOURCE]


def _resolves(dotted: str) -> bool:
    """dogo.a.b.c: the longest importable module prefix, then attributes."""
    import importlib
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            node = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(node, attr):
                return False
            node = getattr(node, attr)
        return True
    return False


def test_every_dogo_name_in_the_docs_and_docstrings_exists():
    """A dotted dogo.* name in prose is a module or an attribute of one, as the tree has it today."""
    wrong = sorted({f"{where}: {name}" for where, text in _prose()
                    for name in re.findall(r"\bdogo(?:\.[A-Za-z_]\w*)+", text)
                    if not _resolves(name.rstrip("."))})
    assert wrong == []


def test_every_python_file_named_in_the_docs_and_docstrings_exists():
    """A bare file name (augment.py) in prose is a file of the tree (code moved: the prose must follow)."""
    files = {p.name for p in REPO.rglob("*.py") if ".venv" not in p.parts}
    wrong = sorted({f"{where}: {name}" for where, text in _prose()
                    for name in re.findall(r"(?<![\w/.-])([a-z_][a-z0-9_]*\.py)\b", text)
                    if name not in files | EXTERNAL_FILES})
    assert wrong == []


FILE_SUFFIXES = {"py", "md", "yaml", "json", "jsonl", "png", "pt", "beton", "sh"}  # augment.py is a file, not a key
EXTERNAL_FILES = {"main_vicreg.py", "main_dino.py", "main_simsiam.py", "main_moco.py", "builder.py",
                  "train_util.py"}  # the papers' official code, named where we follow it


def _config_keys_named(text: str) -> set[str]:
    """Backticked dotted config keys (`optim.lr`, `peers.r18.mocov2.queue_size=4096`), values stripped."""
    from dogo.engine.config import Config
    import dataclasses
    sections = {f.name for f in dataclasses.fields(Config)}
    out = set()
    for span in re.findall(r"`([^`]+)`", text):
        for token in span.split():
            key = token.split("=", 1)[0].rstrip(":,;")
            if re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_]+)+", key) and key.split(".")[0] in sections and \
                    key.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
                out.add(key)
    return out


def test_every_config_key_named_in_the_docs_is_a_key():
    """Backticked config keys in the docs load through the config's schema (a moved or renamed key is stale)."""
    from dogo.engine.config import schema_keys
    valid = set(schema_keys())
    wrong = []
    for doc in DOCS:
        for key in _config_keys_named(doc.read_text()):
            parts = key.split(".")
            if parts[0] in ("peers", "views") and len(parts) > 2:
                parts[1] = "NAME"  # any peer's or view group's name
            if parts[0] == "views" and len(parts) > 4 and parts[3] == "view_recipe":
                parts[4] = "NAME"  # any view of the group
            normal = ".".join(parts)
            if normal not in valid and not any(k.startswith(normal + ".") for k in valid):
                wrong.append(f"{doc.relative_to(REPO)}: {key}")
    assert wrong == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_image_shows_where_the_document_is_rendered(doc):
    """An image link resolves from the document's own folder, as GitHub renders it."""
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", doc.read_text())
    missing = [i for i in images if not i.startswith("http") and not (doc.parent / i).is_file()]
    assert not missing, f"{doc.relative_to(REPO)}: {missing}"
