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
TOP = ("benchmarks/", "configs/", "docs/", "engine/", "pipelines/", "models/", "tests/", "dogo/", ".ci/")


def test_readme_is_short_and_in_order():
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024, len(text.encode())
    assert re.findall(r"^## (.+)$", text, flags=re.M) == SECTIONS


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


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_named_in_the_docs_exists(doc):
    text = doc.read_text()
    missing = sorted(p for p in _named_paths(text) if not _exists(p.rstrip("/"), doc.parent))
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
    """docs/commands.md names every dogo subcommand, and each one's --help carries its full description."""
    import argparse
    from dogo.cli import DESCRIPTIONS, parser
    listed = (REPO / "docs" / "commands.md").read_text()

    def walk(p, prefix):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{prefix} {name}")
                return
        yield prefix.strip(), p
    commands = dict(walk(parser(), ""))
    assert len(commands) == 11, sorted(commands)
    for name, sub in commands.items():
        assert f"dogo {name}" in listed, name
        assert sub.description and sub.description in DESCRIPTIONS.values(), name
