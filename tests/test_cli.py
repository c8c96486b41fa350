"""The `dogo` command run in this process (tests/test_runs.py has those whose process boundary matters): export,
evaluation, fresh starts, and bad input (a message naming what is wrong and exit status 2, no traceback: an
exception other than the command's own errors would fail the test)."""
import json

import pytest
import torch
import torchvision

from dogo.core import checkpoint_files
from tests.helpers import dogo, tiny_config, write_config


def test_checkpoint_from_another_config_is_refused(shapes, tmp_path, capsys):
    cfg = tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 1})
    assert dogo("train", write_config(tmp_path / "a.yaml", cfg)) == 0
    cfg["peers"]["a"]["arch"] = "resnet34"
    capsys.readouterr()
    assert dogo("train", write_config(tmp_path / "b.yaml", cfg)) == 2
    out = capsys.readouterr().out
    assert "written by another config" in out and "peers.a.arch" in out


@pytest.mark.parametrize("change,message", [
    ({"data": {"path": "/no/such/dataset"}}, "does not exist"),
    ({"data": {"batch_size": 4096}}, "larger than the 80 images"),
])
def test_bad_input_is_a_clear_error(shapes, tmp_path, capsys, change, message):
    cfg = tiny_config(shapes, tmp_path / "runs", **change)
    assert dogo("train", write_config(tmp_path / "c.yaml", cfg)) == 2
    assert message in capsys.readouterr().out


def test_unknown_key_on_the_command_line(shapes, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path / "runs"))
    assert dogo("train", cfg, "optim.learning_rate=0.1") == 2
    assert "unknown key 'optim.learning_rate'" in capsys.readouterr().out


def test_export_loads_into_torchvision_strictly(shapes, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 2}))
    assert dogo("train", cfg) == 0
    out = tmp_path / "r18.pt"
    assert dogo("export", tmp_path / "runs" / "t", "--peer", "a", out) == 0
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(out), strict=True)
    model.eval()
    from dogo.engine.ssl.peers import PeerSet
    from dogo.engine.config import from_dict
    state = checkpoint_files.load(checkpoint_files.latest(tmp_path / "runs" / "t"))
    peers = PeerSet(from_dict(state["config"]))
    peers.peers["a"].load_state_dict(state["peers"]["a"])
    backbone = peers.peers["a"].backbone.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), backbone(x), rtol=0, atol=0)


def test_eval_commands_print_knn_table_and_linear_probe(shapes, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 2},
                                                       eval={"knn_every_epochs": 1, "knn_protocol": "custom",
                                                             "knn_k": 5, "knn_temperature": 0.07}))
    assert dogo("train", cfg) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "t"
    assert dogo("eval", "knn", run, "log.progress=off") == 0
    knn = capsys.readouterr().out
    assert "random init" in knn and "resnet18" in knn and "custom (k=5, T=0.07)" in knn
    table = json.loads((run / "knn.json").read_text())
    assert set(table["peers"]) == {"a", "b"} and 0 <= table["peers"]["a"]["trained"] <= 100
    assert table["knn_protocol"] == "custom" and table["k"] == 5
    # a preset named on the command line replaces the run's k and T
    assert dogo("eval", "knn", run, "eval.knn_protocol=lightly", "--json", tmp_path / "lightly.json") == 0
    lightly = json.loads((tmp_path / "lightly.json").read_text())
    assert (lightly["knn_protocol"], lightly["k"], lightly["temperature"]) == ("lightly", 200, 0.1)
    for protocol in ("standard", "fast"):
        assert dogo("eval", "linear", run, "--peer", "b", "--epochs", "2", "--batch-size", "16",
                    "--protocol", protocol) == 0
        lin = capsys.readouterr().out
        assert "top1" in lin and "top5" in lin and f"{protocol} protocol" in lin
        result = json.loads((run / f"linear_b_{protocol}.json").read_text())
        assert result["protocol"] == protocol and 0 <= result["top1"] <= result["top5"] <= 100
    events = [json.loads(l) for l in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    knn_events = [e for e in events if e.get("event") == "knn"]
    assert knn_events and set(knn_events[-1]["top1"]) == {"a", "b"}


def test_fresh_start_sets_earlier_checkpoints_aside(shapes, tmp_path):
    # A longer earlier run in the same folder must not stand in for this run's checkpoints (eval, export and
    # resume take the highest step) nor make `keep` prune this run's files.
    from dogo.engine.config import from_dict
    from dogo.engine.run.trainer import train
    cfg = tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 4}, checkpoint={"every_steps": 1, "keep": 2})
    train(from_dict(cfg))
    run_dir = tmp_path / "runs" / "t"
    earlier = {p.name: p.read_bytes() for p in checkpoint_files.all_checkpoints(run_dir)}
    assert sorted(earlier) == ["step_000000003.pt", "step_000000004.pt"]
    cfg["schedule"]["max_steps"] = 2
    cfg["checkpoint"]["resume"] = "none"
    train(from_dict(cfg))
    assert [p.name for p in checkpoint_files.all_checkpoints(run_dir)] == ["step_000000001.pt", "step_000000002.pt"]
    assert checkpoint_files.load(checkpoint_files.latest(run_dir))["position"]["step"] == 2
    (aside,) = [p for p in checkpoint_files.folder(run_dir).iterdir() if p.is_dir()]
    assert aside.name.startswith("previous_")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == earlier
    events = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "checkpoints_set_aside" for e in events)


@pytest.mark.parametrize("method", ["pca", "tsne", pytest.param("umap", marks=pytest.mark.slow)])  # umap: numba compiles
def test_plot_features_maps_the_val_split(shapes, tmp_path, method):
    pytest.importorskip("sklearn", reason="the viz extra is not installed")
    if method == "umap":
        pytest.importorskip("umap", reason="umap-learn is not installed")
    from dogo.engine.config import from_dict
    from dogo.engine.run.trainer import train
    train(from_dict(tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 1})))
    run = tmp_path / "runs" / "t"
    assert dogo("plot", "features", run, "--peer", "b", "--method", method) == 0
    png = run / f"features_b_{method}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert dogo("plot", "features", run, "--peer", "c") == 2  # a clear error, not a traceback


def test_dogo_commands_in_one_process_run_in_order_and_stop_at_the_first_failure(tmp_path, capsys):
    """dogo.in_one_process (how make gpu-check runs a step of several commands under one import of torch): each
    argument one command line, `mark FILE TEXT` lines appended between them, the first failure's status returned
    and nothing after it run."""
    from dogo.in_one_process import run
    marks = tmp_path / "marks.txt"
    lines = ["config configs/demo.yaml 'name=one two'", f"mark {marks} end first",
             "config configs/demo.yaml precision.cuda_graphs=on device=cpu", f"mark {marks} end second"]
    assert run(lines) == 2
    out = capsys.readouterr().out
    assert "name: one two" in out and "precision.cuda_graphs=on needs CUDA" in out
    assert marks.read_text() == "end first\n"
