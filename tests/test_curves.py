"""TensorBoard event files of a run (tags, steps, a resume continuing the curves) and `dogo plot` pictures."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, dogo, tiny_config, write_config

pytest.importorskip("tensorboard", reason="the viz extra is not installed")
pytest.importorskip("matplotlib", reason="the viz extra is not installed")


def _events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


@pytest.mark.slow
def test_tensorboard_curves_of_a_run_and_its_resume(shapes, tmp_path):
    cfg = tiny_config(shapes, tmp_path, schedule={"max_steps": 3}, eval={"knn_every_epochs": 1},
                      log={"every": 1, "progress": "off", "tensorboard": "on"})
    path = write_config(tmp_path / "c.yaml", cfg)
    assert dogo("train", str(path)) == 0
    run_dir = tmp_path / "t"
    scalars, acc = _events(run_dir)
    for tag in ("loss", "a/ntxent", "b/ntxent", "a/kl", "b/kl", "lr/a", "lr/b", "images_per_s", "knn_top1/a",
                "knn_top1/b"):
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert [s for s, _ in scalars["a/ntxent"]] == [1, 2, 3]
    assert [s for s, _ in scalars["knn_top1/a"]] == [3]
    assert "config" in "".join(acc.Tags()["tensors"])  # the resolved config as text
    # the values are the ones metrics.jsonl holds
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    np.testing.assert_allclose([v for _, v in scalars["loss"]], [r["loss"] for r in steps], rtol=1e-6)

    # a resumed run (3 more steps) continues the same curves: steps 1..6, each once
    assert dogo("train", str(path), "schedule.max_steps=6") == 0
    scalars, _ = _events(run_dir)
    assert [s for s, _ in scalars["a/ntxent"]] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_on_without_the_package_is_a_config_error(monkeypatch):
    import builtins

    from dogo.core.errors import ConfigError
    from dogo.engine.config import load
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert load(None, ["log.tensorboard=auto", "objective.name=simclr"]).log.tensorboard == "off"  # resolved once, when loaded
    assert load(None, ["log.tensorboard=off", "objective.name=simclr"]).log.tensorboard == "off"
    with pytest.raises(ConfigError, match="log.tensorboard=on needs the tensorboard package"):
        load(None, ["log.tensorboard=on", "objective.name=simclr"])


def _non_trivial_png(path: Path, min_bytes: int = 20_000) -> None:
    from PIL import Image
    assert path.is_file() and path.stat().st_size > min_bytes, f"{path} is missing or tiny"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50, "a blank or near-blank picture"
    assert (pixels != 255).any(axis=2).mean() > 0.02, "almost nothing drawn"


def _fake_run(root: Path, name: str, seed: int) -> Path:
    """A run folder's metrics.jsonl as MetricsLogger writes it (two peers, kNN events), without training."""
    from dogo.engine.run.logger import MetricsLogger
    run = root / name
    run.mkdir(parents=True)
    log = MetricsLogger(run, True, 40, 0, 8, 1)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, 41):
        log.add({"loss": 8 - step / 10 + torch.rand((), generator=g), "r18/ntxent": 4 - step / 20 + torch.rand(()),
                 "r18/kl": torch.rand(()), "r50/ntxent": 4 - step / 30 + torch.rand(()), "r50/kl": torch.rand(())})
        if step % 5 == 0:
            log.flush(step, step // 20, {"r18": 1e-3 * (1 - step / 40), "r50": 1e-3 * (1 - step / 40)})
        if step % 20 == 0:
            log.knn(step, step // 20, {"r18": 20 + step / 2 + seed, "r50": 25 + step / 3})
    log.close()
    return run


def test_plot_two_runs_overlaid(tmp_path):
    a, b = _fake_run(tmp_path, "dogo_r18", 0), _fake_run(tmp_path, "simclr_r18", 1)
    out = tmp_path / "pics" / "curves.png"
    assert dogo("plot", "curves", a, b / "metrics.jsonl", "--out", out) == 0
    _non_trivial_png(out)
    assert not list(out.parent.glob("*.tmp")), "a temporary file was left beside the picture"


def test_each_run_is_one_colour_in_every_panel(tmp_path, monkeypatch):
    """Issue 46: the colours changed from panel to panel for one run (each panel cycled through its own lines).
    Each run keeps one colour in every panel, the runs differ, and each peer keeps one line style."""
    from matplotlib.colors import to_hex

    from dogo import plots
    drawn = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, out: (drawn.append(fig), save(fig, out))[1])
    runs = [_fake_run(tmp_path, "dogo_r18", 0), _fake_run(tmp_path, "simclr_r18", 1)]
    assert dogo("plot", "curves", *runs, "--out", tmp_path / "c.png") == 0
    colours, styles = {}, {}
    lines = [line for ax in drawn[0].axes for line in ax.lines]
    for line in lines:
        run, _, peer = line.get_label().partition(" ")
        colours.setdefault(run, set()).add(to_hex(line.get_color()))
        styles.setdefault(peer, set()).add(line.get_linestyle())
    assert len(lines) == 2 * (1 + 2 + 2 + 2 + 2)  # per run: the total, ntxent, kl, lr and kNN of each peer
    assert all(len(c) == 1 for c in colours.values()) and len(set.union(*colours.values())) == 2, colours
    assert set(styles) == {"", "r18", "r50"} and all(len(s) == 1 for s in styles.values()), styles
    assert styles["r18"] != styles["r50"]


@pytest.mark.slow
def test_plot_bench_charts_of_the_committed_results(tmp_path):
    results = REPO / "benchmarks" / "results"
    files = sorted(str(p) for p in results.glob("*.json")
                   if json.loads(p.read_text()).get("benchmark") in ("pipeline", "contrastive_loss", "train_step"))
    assert any("pipeline" in f for f in files) and any("loss" in f for f in files)
    out = tmp_path / "bench.png"
    assert dogo("plot", "bench", *files, "--out", str(out)) == 0
    _non_trivial_png(out)


def test_plot_errors_name_the_file(tmp_path, capsys):
    said = lambda: " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    (tmp_path / "empty").mkdir()
    assert dogo("plot", "curves", tmp_path / "empty") == 2
    assert "empty: no metrics.jsonl there" in said()
    (tmp_path / "x.json").write_text('{"benchmark": "other"}')
    assert dogo("plot", "bench", tmp_path / "x.json") == 2
    assert "x.json: not a dogo benchmark result" in said()


def test_plot_keeps_the_history_of_a_run_resumed_after_a_kill(tmp_path):
    """Issue 32 G4: steps 1-6 logged, killed, resumed from the step-4 checkpoint, steps 5-8 logged: the curve is
    steps 1-8 (5 and 6 from the resumed run), not only the steps after the resume."""
    from dogo.engine.run.logger import read_metrics
    rows = [{"step": s, "epoch": 0, "loss": 10.0 - s} for s in range(1, 7)]
    rows += [{"event": "knn", "step": 2, "top1": {"a": 20.0}}, {"event": "knn", "step": 6, "top1": {"a": 30.0}}]
    rows += [{"event": "resume", "step": 4, "path": "ck"}]
    rows += [{"step": s, "epoch": 0, "loss": 20.0 - s} for s in range(5, 9)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, steps, knn = read_metrics(path)
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [r["loss"] for r in steps] == [9.0, 8.0, 7.0, 6.0, 15.0, 14.0, 13.0, 12.0]
    assert [k["step"] for k in knn] == [2]  # the step-6 kNN belonged to the replayed steps
    # a fresh start (no resume event) in the same folder still begins the curves again
    path.write_text(path.read_text() + "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))
    assert [r["step"] for r in read_metrics(path)[1]] == [1, 2]
