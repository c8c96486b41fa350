"""`make gpu-check` (benchmarks/gpu_check.sh): one line and no traceback where there is no GPU, and every step of
the check rehearsed here at tiny sizes on the CPU, from an interpreter that has torch but not the project (as on a
GPU machine with its own torch), so that a broken step is found here and not in a rare GPU session."""
import json
import site
import subprocess
import sys
import venv

import pytest

from tests.helpers import REPO, cli_env


def test_make_gpu_check_without_a_gpu_says_so_in_one_line():
    proc = subprocess.run(["make", "-s", "gpu-check", f"PY={sys.executable}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=cli_env())
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 1, proc.stdout + proc.stderr
    assert "no GPU found" in lines[0] and "Traceback" not in lines[0]


def _interpreter_with_torch_only(where) -> str:
    """A fresh virtual environment that sees this one's packages (torch and pip among them) through a path file,
    but has no dogo installed: what a GPU machine's own python is to the check."""
    venv.create(where)
    packages = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
    target = next((where / "lib").glob("python*/site-packages"))
    (target / "torch_from_elsewhere.pth").write_text(packages + "\n")
    return str(where / "bin" / "python")


@pytest.mark.slow
def test_every_step_rehearsed_on_the_cpu(tmp_path):
    py = _interpreter_with_torch_only(tmp_path / "venv")
    assert subprocess.run([py, "-c", "import dogo.benchmarks"], cwd=tmp_path, capture_output=True).returncode != 0
    out = tmp_path / "results"
    env = {**cli_env(), "PY": py, "CIFAR": ""}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--rehearsal", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=env)
    report = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    steps = dict(line.split("\t")[:2] for line in (out / "steps.log").read_text().splitlines())
    assert set(steps) == {"environment", "train_r18_r50", "cifar_step", "loss", "recipe", "pipeline", "ddp_sigterm",
                          "cifar_study", "demo", "pytest"}, steps
    assert all(status == "ok" or status.startswith("skipped") for status in steps.values()), report
    summary = json.loads((out / "summary.json").read_text())
    for key in ("DoGo R18+R50 224px: images/s whole / engine / ceiling", "CIFAR SimCLR R18 32px: MFU, ops per step",
                "CIFAR SimCLR R18 32px: CUDA graphs, launches per step",
                "torchrun SyncBN, SIGTERM", "make demo kNN (trained vs random init)",
                "device recipe per image per view: eager / compiled", "folder backend, recipe on device: images/s"):
        assert key in summary, summary
    assert any(k.startswith("loss bf16, 256 views") for k in summary) and "summary" in proc.stdout
    assert not (out / "runs").exists()  # checkpoints are not results
