"""Issue 44, the third fault pass: results computed from nothing, evaluation on few classes or a small training
split, unlabelled data where labels are needed, damaged .beton files and checkpoints, links planted in a run folder,
a metrics file cut short by a full disk, TensorBoard on a full disk, W&B without a server or a key, a timm model too
large for the views, and plots of too little. Each test names its case's id."""
import json
import os
import shutil
import time

import pytest
import torch

from dogo.engine import config as config_mod
from dogo.core.errors import CheckpointError, ConfigError, DataError
from dogo.core import checkpoint_files
from dogo.engine.eval.saved import SavedRun
from dogo.engine.run import checkpoint
from tests.helpers import dogo, in_a_process_of_its_own, tiny_config, write_config


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory):
    """A tiny trained run (one step) to evaluate, plot and load."""
    from dogo.engine.run.trainer import train
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path_factory.mktemp("runs"), schedule={"max_steps": 1}))
    train(cfg)
    return cfg.run_dir


def _copy(shapes, root, classes=None, undecodable_val=0, keep_val=None):
    """shapes' train and val splits (only `classes`, if given) under `root`; the first `undecodable_val` val images
    (all but `keep_val`, if given) overwritten with bytes no decoder reads."""
    for split in ("train", "val"):
        for folder in sorted((shapes / split).iterdir()):
            if classes is None or folder.name in classes:
                shutil.copytree(folder, root / split / folder.name)
    val = sorted((root / "val").rglob("*.jpg"))
    bad = val[:undecodable_val] if keep_val is None else val[keep_val:]
    for path in bad:
        path.write_bytes(b"not an image")
    return root


def _said(capsys) -> str:
    return " ".join(capsys.readouterr().out.split())


# ---- N1: nothing decodable in the val split ----------------------------------------------------------------------

def test_N1_eval_on_a_val_split_that_does_not_decode_is_an_error_not_a_nan_file(run, shapes, tmp_path, capsys):
    """N1: every val image undecodable: eval knn printed nan and wrote knn.json, eval linear "top1 nan%", exit 0.
    Now one line naming the split and what to do, and no result file."""
    data = _copy(shapes, tmp_path / "data", undecodable_val=30)
    out = tmp_path / "knn.json"
    capsys.readouterr()
    assert dogo("eval", "knn", run, f"data.path={data}", "--json", out) == 2
    said = _said(capsys)
    assert f"{data / 'val'}: none of the 30 images asked for could be decoded" in said and "data.path" in said, said
    assert not out.exists()
    out = tmp_path / "linear.json"
    assert dogo("eval", "linear", run, f"data.path={data}", "--peer", "a", "--protocol", "fast", "--epochs", "1",
                "--json", out) == 2
    assert "none of the 30 images asked for could be decoded" in _said(capsys) and not out.exists()


def test_N1_the_standard_probe_finds_an_unreadable_val_split_before_training(shapes, tmp_path):
    """N1: the standard probe extracted the val features after its epochs; the backbone is frozen, so they are taken
    first and an unreadable split stops it at once (here: 1,000 epochs would take minutes)."""
    from dogo.engine.dist.distributed import DistContext
    from dogo.engine.eval.linear import standard_probe
    from dogo.core.precision import Precision
    from dogo.pipelines import open_eval_split
    data = _copy(shapes, tmp_path / "data", undecodable_val=30)
    cfg = config_mod.from_dict(tiny_config(data, tmp_path))
    train, val = (open_eval_split(cfg.data, s, 0) for s in ("train", "val"))
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="none of the 30 images asked for could be decoded"):
        standard_probe(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()), train, val,
                       recipe=cfg.augment, ctx=ctx, precision=Precision(torch.float32, False), epochs=1000,
                       batch_size=16)
    assert time.perf_counter() - t0 < 10


def test_N1_the_kNN_monitor_skips_an_unreadable_val_split_and_says_so(shapes, tmp_path):
    """N1: in training, the kNN monitor's NaN event crashed the run (NaN is not JSON). The evaluation is skipped
    with an event naming the split; training goes on and finishes."""
    from dogo.engine.run.trainer import train
    data = _copy(shapes, tmp_path / "data", undecodable_val=30)
    cfg = config_mod.from_dict(tiny_config(data, tmp_path, schedule={"max_steps": 2},
                                           eval={"knn_every_epochs": 1, "online_probe": "on"}))
    result = train(cfg)
    assert result["step"] == 2 and result["knn_top1"] == {}
    events = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e.get("event") == "evaluation_skipped"]
    assert len(skipped) == 1 and str(data / "val") in skipped[0]["reason"], events
    assert events[-1]["event"] == "done"


def test_N1_a_nan_inside_an_event_is_written_as_null_and_named(tmp_path):
    """N1: the kNN event's top1 is a mapping; a NaN in it made json.dumps raise. It is null, and named."""
    from dogo.engine.run.logger import MetricsLogger
    log = MetricsLogger(tmp_path, True, 10, 0, 8, 1)
    log.knn(3, 0, {"a": float("nan"), "b": 12.5})
    [line] = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["top1"] == {"a": None, "b": 12.5} and record["nonfinite"] == ["top1.a"]


def test_N1_accuracy_of_nothing_or_of_nan_scores_is_an_error():
    """N1: top-k of no image was NaN, of NaN scores a number; both are errors now."""
    from dogo.engine.eval.evaluate import topk_accuracy
    with pytest.raises(DataError, match="no labelled image"):
        topk_accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ConfigError, match="not finite"):
        topk_accuracy(torch.tensor([[0.1, float("nan")]]), torch.tensor([0]))


# ---- L1, L2: few classes, a small training split -----------------------------------------------------------------

def test_L1_top_k_is_scored_only_up_to_the_number_of_classes():
    """L1: top-5 of 3 classes raised in torch's topk. Each k up to the class count, checked against a straight
    count; the keys say which k."""
    g = torch.Generator().manual_seed(0)
    from dogo.engine.eval.evaluate import topk_accuracy
    scores, labels = torch.randn(50, 3, generator=g), torch.randint(0, 3, (50,), generator=g)
    got = topk_accuracy(scores, labels)
    assert set(got) == {"top1"}
    assert got["top1"] == pytest.approx(100 * (scores.argmax(1) == labels).double().mean().item())
    assert set(topk_accuracy(torch.randn(4, 5, generator=g), torch.arange(4))) == {"top1", "top5"}


def test_L1_eval_linear_and_eval_table_on_three_classes(run, shapes, tmp_path, capsys):
    """L1: `dogo eval linear` and `eval table` on a dataset of fewer than 5 classes were tracebacks; now they run and
    the JSON names the k it scored (top1; no top5)."""
    data = _copy(shapes, tmp_path / "three", classes=("circle", "square", "star"))
    out = tmp_path / "linear.json"
    assert dogo("eval", "linear", run, f"data.path={data}", "--peer", "a", "--protocol", "fast", "--epochs", "2",
                "--json", out) == 0
    result = json.loads(out.read_text())
    assert "top1" in result and "top5" not in result and 0 <= result["top1"] <= 100
    assert dogo("eval", "linear", run, f"data.path={data}", "--peer", "a", "--epochs", "1", "--batch-size", "8",
                "--json", out) == 0
    assert "top5" not in json.loads(out.read_text())
    table = tmp_path / "table.json"
    assert dogo("eval", "table", run, "--set", f"data.path={data}", "--epochs", "2", "--json", table) == 0
    rows = json.loads(table.read_text())["rows"]
    assert all(r["linear_top5"] is None and 0 <= r["linear_top1"] <= 100 for r in rows), rows


def test_L2_the_probes_batch_fits_the_training_split(shapes, tmp_path):
    """L2: the standard probe's default batch (256) on a small training split was a ValueError. The probe itself
    refuses it naming --batch-size; probe_batch lowers it to what the split holds, with a note (eval table uses it)."""
    from dogo.engine.dist.distributed import DistContext
    from dogo.engine.eval.linear import probe_batch, standard_probe
    from dogo.core.precision import Precision
    from dogo.pipelines import open_eval_split
    assert probe_batch(256, 36, 1) == (36, "--batch-size 256 is more than the 36 training images: the probe used "
                                           "batches of 36")
    assert probe_batch(256, 36, 8) == (32, probe_batch(256, 36, 8)[1])
    assert probe_batch(30, 36, 4)[0] == 28 and "does not divide over 4 ranks" in probe_batch(30, 36, 4)[1]
    assert probe_batch(32, 36, 4) == (32, None)
    with pytest.raises(DataError, match="at least one training image per rank: the training split has 3 for 4"):
        probe_batch(256, 3, 4)
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path))
    train, val = (open_eval_split(cfg.data, s, 0) for s in ("train", "val"))
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(DataError, match=r"batch of 256 \(--batch-size\) is larger than the 80 training images .* "
                                        r"give --batch-size 80 or less"):
        standard_probe(torch.nn.Flatten(), train, val, recipe=cfg.augment, ctx=ctx,
                       precision=Precision(torch.float32, False), epochs=1)


def test_L2_eval_table_with_the_standard_protocol_on_a_small_split(run, shapes, tmp_path):
    """L2: `eval table --protocol standard` has no --batch-size: on 80 training images its 256 is lowered, and each
    row says so."""
    table = tmp_path / "table.json"
    assert dogo("eval", "table", run, "--protocol", "standard", "--epochs", "1", "--set", f"data.path={shapes}",
                "--json", table) == 0
    rows = json.loads(table.read_text())["rows"]
    assert all("the probe used batches of 80" in r["linear_note"] for r in rows), rows


# ---- U1, U2: unlabelled data where labels are needed -------------------------------------------------------------

def test_U1_evaluating_an_unlabelled_run_on_its_own_folders_is_refused(run, capsys):
    """U1: a data.labels=none run evaluated on its own folders numbered the sub-folders as classes. Refused, saying
    to pass a labelled dataset."""
    capsys.readouterr()
    assert dogo("eval", "knn", run, "data.labels=none") == 2
    said = _said(capsys)
    assert "data.labels=none" in said and "data.path=LABELLED data.labels=folders" in said, said
    assert "Traceback" not in said


@pytest.fixture(scope="module")
def unlabelled_beton(shapes, tmp_path_factory):
    """shapes' training split converted with --labels none, about half its images as JPEG and half as raw pixels."""
    pytest.importorskip("ffcv", reason="the ffcv extra is not installed")
    from dogo.pipelines.convert import ConvertOptions, convert
    out = tmp_path_factory.mktemp("beton") / "unlabelled.beton"
    convert(shapes / "train", out, ConvertOptions(num_workers=1, labels="none", write_mode="proportion"), log=None)
    return out


def test_U2_an_unlabelled_beton_with_labels_folders_is_refused_before_training(unlabelled_beton, shapes, tmp_path):
    """U2: a .beton converted with --labels none, trained with the online probe on, logged a chance probe (every
    label -1). The loader knows its labels: refused before any step, saying what to set."""
    from dogo.engine.run.trainer import Trainer
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path, data={"backend": "ffcv",
                                                                   "ffcv": {"beton": str(unlabelled_beton)}},
                                           eval={"online_probe": "on"}))
    with pytest.raises(DataError, match=r"holds no labels \(every label is -1.*--labels none\) but "
                                        r"data.labels=folders; train it with data.labels=none"):
        Trainer(cfg)
    assert not (tmp_path / "t" / "metrics.jsonl").exists()


# ---- X4: a .beton whose declared sizes disagree with its bytes ---------------------------------------------------

def _declare(src, dst, sample: int, width: int, height: int) -> None:
    """A copy of .beton `src` at `dst` whose sample declares another image size (its bytes unchanged)."""
    import numpy as np
    from ffcv.reader import Reader
    from ffcv.types import HeaderType
    shutil.copy(src, dst)
    reader = Reader(str(dst))
    offset = HeaderType.itemsize + reader.field_descriptors.nbytes + sample * reader.metadata.itemsize
    meta = np.memmap(dst, reader.metadata.dtype, mode="r+", offset=offset, shape=(1,))
    meta["f0"]["width"], meta["f0"]["height"] = width, height
    meta.flush()


def test_X4_declared_image_sizes_are_checked_against_the_stored_bytes(unlabelled_beton, tmp_path):
    """X4: a sample declaring 30 x 30 (under the pixel limit) over 32 x 32 stored pixels trained on garbage. Opening
    the .beton checks every raw image's byte count and every JPEG's frame header."""
    from ffcv.reader import Reader

    from dogo.pipelines.backends.ffcv_loader import open_beton
    open_beton(unlabelled_beton)  # the converter's own file passes
    modes = Reader(str(unlabelled_beton)).metadata["f0"]["mode"]
    for mode, stores in ((1, r"\(2700 bytes of raw pixels\) but stores 3072 bytes"), (0, "but stores a 32 x 32 JPEG")):
        sample = int((modes == mode).nonzero()[0][0])
        bad = tmp_path / f"mode{mode}.beton"
        _declare(unlabelled_beton, bad, sample, 30, 30)
        with pytest.raises(DataError, match=f"sample {sample} declares a 30 x 30 image {stores}.*convert the dataset "
                                            f"again"):
            open_beton(bad)


# ---- S7: links planted in a run folder ---------------------------------------------------------------------------

def test_S7_a_link_at_the_lock_or_the_metrics_file_is_refused_and_its_target_untouched(tmp_path):
    """S7: a symbolic link planted at RUN/.lock made a run truncate its target; metrics.jsonl links were followed.
    Both are refused, naming the link; the target keeps its bytes."""
    from dogo.engine.run.logger import MetricsLogger
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(victim)
    with pytest.raises(CheckpointError, match=rf"{run_dir / '.lock'} is a symbolic link \(to {victim}\).*remove it"):
        checkpoint.RunLock(run_dir)
    (run_dir / ".lock").unlink()
    checkpoint.RunLock(run_dir).release()  # a plain file is taken as before
    (run_dir / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(CheckpointError, match="metrics.jsonl is a symbolic link"):
        MetricsLogger(run_dir, True, 10, 0, 8, 1).event("x", "an event")
    assert victim.read_text() == "keep me\n"


# ---- X3: a metrics file cut short ------------------------------------------------------------------------------

def test_X3_a_resume_drops_the_partial_last_line_first_and_plot_reads_the_file(shapes, tmp_path):
    """X3: after a disk-full stop, the resume record was appended to the half-written last line
    (`...e-0{"event": "resume", ...}`) and `dogo plot` refused the run for good. The partial line is dropped, with
    an event saying so, before anything is appended; every line then parses."""
    from dogo.engine.run.trainer import train
    from dogo.engine.run.logger import read_metrics
    train(config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 1})))
    metrics = tmp_path / "t" / "metrics.jsonl"
    whole = metrics.read_text()
    partial = '{"step": 2, "epoch": 0, "loss": 7.1e-0'  # what a full disk leaves
    metrics.write_text(whole + partial)
    with pytest.warns(UserWarning, match=rf"{metrics}:{len(whole.splitlines()) + 1}: the last line was cut short"):
        read_metrics(metrics)  # dogo plot skips a partial last line, naming it
    train(config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 2})))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert metrics.read_text().startswith(whole)
    events = [r["event"] for r in records if "event" in r]
    assert events[events.index("metrics_repaired") + 1] == "resume", events
    assert [r["dropped_bytes"] for r in records if r.get("event") == "metrics_repaired"] == [len(partial)]


def test_X3_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    from dogo.engine.run.logger import drop_partial_line
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}')
    assert drop_partial_line(path) == 0 and path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"st')
    assert drop_partial_line(path) == 4 and path.read_text() == ""


# ---- X5: a metrics line that is JSON but not a record -----------------------------------------------------------

def test_X5_a_metrics_line_that_is_json_but_not_an_object_is_one_line(tmp_path, capsys):
    """X5: `dogo plot` of a metrics.jsonl line such as [1, 2] was a traceback (list has no 'get')."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "epoch": 0, "loss": 1.0}\n[1, 2]\n')
    capsys.readouterr()
    assert dogo("plot", "curves", path, "--out", tmp_path / "c.png") == 2
    said = _said(capsys)
    assert f"{path}:2 is JSON but not a record (a list" in said, said


# ---- H5b: TensorBoard on a full disk -----------------------------------------------------------------------------

def _train_with_file_size_limit(config_path: str, limit: int):
    """`dogo train` under RLIMIT_FSIZE (a full disk for every file that reaches `limit` bytes): (exit status,
    stdout, stderr)."""
    import contextlib
    import io
    import resource
    import signal

    from dogo.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", config_path])
        time.sleep(0.2)  # a writer thread's traceback, if any, would be printed by now
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow  # a process of its own
def test_H5b_tensorboard_on_a_full_disk_is_one_line_naming_its_file_and_frees_the_lock(shapes, tmp_path):
    """H5b: a failed TensorBoard write printed its writer thread's traceback, the error line said "a file", and
    RUN/.lock kept the dead run's pid. Here the events file reaches a file-size limit that config.yaml and
    metrics.jsonl stay under."""
    raw = tiny_config(shapes, tmp_path, schedule={"max_steps": 2}, log={"every": 1, "progress": "off",
                                                                           "tensorboard": "on"})
    path = write_config(tmp_path / "c.yaml", raw)
    config_text = config_mod.dump_text(config_mod.load(path))  # what TensorBoard's first event holds, and more
    code, out, err = in_a_process_of_its_own(_train_with_file_size_limit, str(path), len(config_text) + 400)
    said = " ".join((out + err).split())
    events = list((tmp_path / "t" / "tb").glob("events.out.tfevents.*"))
    assert code == 2 and len(events) == 1, said
    assert f"{events[0]}: File too large" in said and "Traceback" not in said, said
    assert (tmp_path / "t" / ".lock").read_text() == "", "the lock still names the stopped run"


# ---- W2: W&B online without a server or a key -------------------------------------------------------------------

def _start_wandb_online(run_dir: str, env: dict):
    """WandbLog(online) under `env` in a fresh process: (error message or None, seconds taken)."""
    os.environ.update(env)
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        if key not in env:
            os.environ.pop(key, None)
    from dogo.engine.run.logger import WandbLog
    t0 = time.perf_counter()
    try:
        WandbLog(run_dir, 0, {}, "online", "p", "", "t").close()
        return None, time.perf_counter() - t0
    except ConfigError as exc:
        return str(exc), time.perf_counter() - t0


@pytest.mark.slow  # a process of its own
def test_W2_wandb_online_without_a_reachable_server_fails_fast(tmp_path):
    """W2: log.wandb=online with no reachable server waited 94 s, then a traceback. A closed local port: one
    ConfigError within seconds, saying what to do."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from tests.helpers import free_port
    env = {"WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}", "WANDB_API_KEY": "x" * 40,
           "HOME": str(tmp_path), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    said, seconds = in_a_process_of_its_own(_start_wandb_online, str(tmp_path), env)
    assert said and "cannot be reached" in said and "log.wandb=offline" in said, said
    assert seconds < 5, seconds


@pytest.mark.slow  # a process of its own
def test_W2_wandb_online_without_an_api_key_is_one_line(tmp_path):
    """W2: without an API key, a traceback. A server that accepts connections (a local listening socket) and no
    key: one ConfigError naming wandb login and log.wandb=offline."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    import socket
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        env = {"WANDB_BASE_URL": f"http://127.0.0.1:{server.getsockname()[1]}", "HOME": str(tmp_path),
               "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        said, seconds = in_a_process_of_its_own(_start_wandb_online, str(tmp_path), env)
    assert said and "wandb login" in said and "log.wandb=offline" in said and "API key" in said, said
    assert seconds < 10, seconds


# ---- H7b: the online probe after the class count changed ---------------------------------------------------------

def test_H7b_a_resume_with_another_class_count_restarts_the_online_probe_and_says_so(shapes, tmp_path):
    """H7b: resuming an online-probe run after the class count changed was torch's size-mismatch traceback. The
    probe starts afresh (as one turned on at a resume does), with an event; the peers resume as before."""
    from dogo.engine.run.trainer import Trainer, train
    train(config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 1},
                                           eval={"online_probe": "on"})))
    three = _copy(shapes, tmp_path / "three", classes=("circle", "square", "star"))
    trainer = Trainer(config_mod.from_dict(tiny_config(three, tmp_path, schedule={"max_steps": 2},
                                                       data={"batch_size": 8}, eval={"online_probe": "on"})))
    trainer._open_run().close()
    assert trainer.pos.step == 1
    assert trainer.probe.classifiers["a"].weight.shape[0] == 3
    events = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    [restarted] = [e for e in events if e.get("event") == "online_probe_restarted"]
    assert "(10, 512) there, (3, 512) now" in restarted["reason"], restarted


# ---- T2: a timm model that cannot take the view size -------------------------------------------------------------

@pytest.mark.parametrize("arch, size", [("timm:vit_tiny_patch16_224", 8), ("timm:inception_v3", 32)])
def test_T2_a_timm_model_too_large_for_the_views_is_one_line(arch, size, shapes, tmp_path, capsys):
    """T2: a ViT with 16 px patches at 8 px and inception_v3 at 32 px failed in the memory estimator's trial forward
    with a convolution's traceback, under --dry-run too."""
    pytest.importorskip("timm", reason="the timm extra is not installed")
    raw = tiny_config(shapes, tmp_path, data={"image_size": size}, objective={"name": "simclr"})
    raw["peers"] = {"v": {"arch": arch, "head_hidden": 16, "head_out": 8, "tau": 0.5}}
    path = write_config(tmp_path / "c.yaml", raw)
    capsys.readouterr()
    assert dogo("train", path, "--dry-run") == 2
    said = _said(capsys)
    assert f"peers.v.arch={arch} cannot take data.image_size={size} px views" in said, said
    assert "raise data.image_size" in said and "Traceback" not in said


# ---- PF2: a map of too few features ------------------------------------------------------------------------------

@pytest.mark.parametrize("readable", [0, 1])
def test_PF2_plot_features_with_too_few_readable_val_images_is_one_line(readable, run, shapes, tmp_path, capsys):
    """PF2: `dogo plot features` with 0 or 1 decodable val image gave scikit-learn's tracebacks."""
    pytest.importorskip("sklearn", reason="the viz extra is not installed")
    data = _copy(shapes, tmp_path / "data", keep_val=readable)
    capsys.readouterr()
    assert dogo("plot", "features", run, f"data.path={data}", "--peer", "a", "--method", "pca",
                "--out", tmp_path / "f.png") == 2
    said = _said(capsys)
    expected = "none of the 30 images asked for could be decoded" if not readable else \
        "a pca map needs the features of at least 2 images; the split gave 1"
    assert expected in said and "Traceback" not in said, said


# ---- S2: malformed checkpoints, structural overrides at eval ----------------------------------------------------

def test_S2_a_damaged_checkpoint_is_one_line_naming_the_file(run, tmp_path, capsys):
    """S2: a checkpoint with config=[] (loadable, but not what the trainer writes) was a traceback at eval."""
    state = checkpoint_files.load(checkpoint_files.latest(run))
    bad = tmp_path / "config_list.pt"
    torch.save({**state, "config": []}, bad)
    capsys.readouterr()
    assert dogo("eval", "knn", bad) == 2
    said = _said(capsys)
    assert f"{bad} is a damaged dogo checkpoint (its config is a list, not a mapping)" in said, said
    torch.save({**state, "position": {"step": "x"}}, bad)
    with pytest.raises(CheckpointError, match="its position is not step, epoch and step_in_epoch"):
        checkpoint_files.load(bad)


def test_S2_peers_that_do_not_fit_the_model_are_named(run, tmp_path):
    """S2: a peer with missing keys or wrong shapes, and a structural override at eval (peers.a.head_out=8), were
    torch's load_state_dict tracebacks. SavedRun.open (every command's checkpoint loading) checks every peer's
    tensors against the model the config builds (on the meta device) and names what differs."""
    path = checkpoint_files.latest(run)
    SavedRun.open(path)  # whole: loads
    with pytest.raises(CheckpointError, match=r"the overrides change a peer's shapes \(peer 'a' does not fit the "
                                              r"model \(.*wrong shapes: head\..*\(expected .*8"):
        SavedRun.open(path, ["peers.a.head_out=8"])
    state = checkpoint_files.load(path)
    first = next(iter(state["peers"]["b"]))
    del state["peers"]["b"][first]
    bad = tmp_path / "missing.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=rf"{bad}: its peer 'b' does not fit the model \(1 missing keys: "
                                              rf"{first}\).*damaged or was edited"):
        SavedRun.open(bad)


def test_S2_a_resume_from_a_checkpoint_with_a_wrong_shape_is_one_line(shapes, tmp_path):
    """S2: the same in a resume: torch's RuntimeError became a CheckpointError naming the file and the tensor."""
    from dogo.engine.run.trainer import Trainer, train
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 1}))
    train(cfg)
    path = checkpoint_files.latest(cfg.run_dir)
    state = checkpoint_files.load(path)
    key = next(k for k in state["peers"]["a"] if k.endswith("weight") and k.startswith("head."))
    state["peers"]["a"][key] = state["peers"]["a"][key][:-1]
    torch.save(state, path)
    trainer = Trainer(config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 2})))
    with pytest.raises(CheckpointError, match=rf"{path}: peer 'a' does not fit this run's model \(1 wrong shapes: "
                                              rf"{key}"):
        trainer.resume()
