"""Bad input and faults that must not pass silently: config values out of range, YAML's number forms, a refused
resume that must leave the run's config alone, and half-written checkpoints left by a kill."""
import os

import pytest

from dogo.core import checkpoint_files
from dogo.engine.run import checkpoint
from dogo.engine import config as config_mod
from dogo.core.errors import CheckpointError, ConfigError
from tests.helpers import tiny_config, write_config


@pytest.mark.parametrize("override, message", [
    ("peers.a.head_out=0", "peers.a.head_out must be positive"),
    ("peers.b.head_hidden=-1", "peers.b.head_hidden must be positive"),
    ("augment.blur_p=1.5", r"augment.blur_p is a probability: it must be in \[0, 1\]"),
    ("augment.flip_p=-0.1", "augment.flip_p is a probability"),
    ("data.workers=-1", "data.workers must be 0 or more"),
    ("optim.lr=-0.3", "optim.lr must be 0 or more"),
    ("peers.a.lr=-1", "peers.a.lr must be 0 or more"),
    ("checkpoint.every_steps=-5", "checkpoint.every_steps must be 0 or more"),
    ("name=../../elsewhere", "must be a plain folder name"),
    ("name=a/b", "must be a plain folder name"),
])
def test_out_of_range_values_are_config_errors(shapes, tmp_path, override, message):
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path))
    with pytest.raises(ConfigError, match=message):
        config_mod.load(path, [override])


def test_numbers_in_yaml_exponent_form_are_numbers(shapes, tmp_path):
    """PyYAML reads 3e-4 (no dot) as a string; a float key takes it as the number it is."""
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path))
    text = path.read_text().replace("lr: 0.5", "lr: 3e-4")
    assert "lr: 3e-4" in text
    path.write_text(text)
    cfg = config_mod.load(path, ["optim.weight_decay=1e-6"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 1e-6
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        config_mod.load(path, ["optim.lr=fast"])


def test_a_refused_resume_leaves_the_runs_config_as_it_was(shapes, tmp_path):
    from dogo.engine.run.trainer import train
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 2}))
    train(cfg)
    written = (cfg.run_dir / "config.yaml").read_text()
    other = config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 4}, data={"batch_size": 16}))
    with pytest.raises(CheckpointError, match="batch_size"):
        train(other)
    assert (cfg.run_dir / "config.yaml").read_text() == written


def test_half_written_checkpoints_of_a_killed_run_are_removed_at_start(shapes, tmp_path):
    from dogo.engine.run.trainer import train
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 1}))
    folder = checkpoint_files.folder(cfg.run_dir)
    folder.mkdir(parents=True)
    stale = folder / ".step_000000003.pt.k2j4x.tmp"  # what atomic_write leaves when killed mid-write
    stale.write_bytes(b"half a checkpoint")
    train(cfg)
    assert not stale.exists()
    assert "stale_temporaries" in (cfg.run_dir / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_a_diverging_run_keeps_its_last_good_checkpoint_and_eval_refuses_a_bad_one(shapes, tmp_path, capsys):
    """Issue 32 E1/E2: a good run (SGD, lr 0.1, keep=1), then the same run resumed at optim.lr=1e36: the weights
    reach ~1e34 while every loss is still finite. No checkpoint of diverged weights is written, so the good one is
    neither replaced nor pruned, and it stays usable; a checkpoint with NaN weights is refused by eval."""
    import torch

    from dogo.engine.run.trainer import train
    from tests.helpers import dogo
    good = dict(optim={"name": "sgd", "lr": 0.1}, checkpoint={"every_steps": 1, "keep": 1},
                schedule={"max_steps": 3, "warmup_epochs": 0})
    train(config_mod.from_dict(tiny_config(shapes, tmp_path, **good)))
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path, **{**good, "optim": {"name": "sgd", "lr": 1e36},
                                                                "schedule": {"max_steps": 8, "warmup_epochs": 0}}))
    with pytest.raises(ConfigError, match=r"the weights diverged by step 4: .*no checkpoint was written for it, so the newest stays .*step_000000003"):
        train(cfg)
    kept = checkpoint_files.all_checkpoints(cfg.run_dir)
    assert [p.name for p in kept] == ["step_000000003.pt"], kept
    checkpoint_files.check_finite(checkpoint_files.load(kept[0]), kept[0])
    assert dogo("eval", "knn", cfg.run_dir) == 0
    # a checkpoint whose weights are NaN (from before this check existed, or edited) is refused
    state = checkpoint_files.load(kept[-1])
    name = next(iter(state["peers"]["a"]))
    state["peers"]["a"][name] = torch.full_like(state["peers"]["a"][name], float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    capsys.readouterr()
    assert dogo("eval", "knn", bad) == 2 and "non-finite" in capsys.readouterr().out


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    import torch
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "backbone.pt")
    with pytest.raises(CheckpointError, match="backbone.pt is not a dogo checkpoint .*no config"):
        checkpoint_files.load(tmp_path / "backbone.pt")


def test_a_resume_applies_a_changed_lr_and_weight_decay_and_says_so(shapes, tmp_path):
    """The optimiser's momenta come from the checkpoint, its settings from the config now: what config.yaml and the
    checkpoint record is what runs, and the log names each change."""
    from dogo.engine.run.trainer import Trainer, train
    train(config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 2})))
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 4},
                                           optim={"name": "lars", "lr": 0.05, "weight_decay": 0.01}))
    trainer = Trainer(cfg)
    trainer._open_run().close()
    assert trainer.pos.step == 2
    decayed = [g for g in trainer.optimizer.param_groups if g["lars"]]
    assert all(g["base_lr"] == pytest.approx(0.05 * 8 / 256) and g["weight_decay"] == 0.01 for g in decayed)
    assert any(c.startswith("optim.lr: 0.5 -> 0.05") for c in trainer.resume_changes)
    assert any(c.startswith("optim.weight_decay:") for c in trainer.resume_changes)
    assert "\"event\": \"resume_settings\"" in (cfg.run_dir / "metrics.jsonl").read_text()
    state = trainer.optimizer.state_dict()
    assert any(len(s) for s in state["state"].values()), "the momentum buffers came from the checkpoint"


@pytest.mark.slow
def test_a_second_run_into_a_busy_run_folder_is_refused(shapes, tmp_path, capsys):
    """Two runs into one folder: the second is refused while the first holds the folder's lock; once the first
    process is gone (killed: the kernel drops its lock), the next run takes the lock over and says so. The holder
    is a process of its own; the runs after it run in this one."""
    import subprocess
    import sys
    import time

    from tests.helpers import REPO, dogo
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path, schedule={"max_steps": 1}))
    run_dir = tmp_path / "t"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from dogo.engine.run.checkpoint import RunLock; RunLock(sys.argv[1]); print('held', "
        "flush=True); time.sleep(60)"), str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        code = dogo("train", path)
        said = " ".join(capsys.readouterr().out.split())
        assert code == 2 and f"is in use by another dogo run (process {holder.pid})" in said, said
        assert not (run_dir / "metrics.jsonl").exists(), "the refused run wrote nothing"
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.2)
    assert dogo("train", path) == 0
    import json
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "lock_taken_over", "pid": str(holder.pid)} in events
    # a run that finished cleanly hands the folder on without a takeover line
    assert dogo("train", path, "checkpoint.resume=none") == 0
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e.get("event") == "lock_taken_over"] == ["lock_taken_over"], events


# One backbone of each registered family: the ResNets share one code path (no random layers); EfficientNet draws
# stochastic depth and MobileNet dropout from the torch RNG. (All six pass; the deeper ResNets add 40 s.)
RESUME_ARCHS = ["resnet18", "efficientnet_b0", "mobilenet_v3_large"]


def test_every_registered_backbone_family_is_in_the_resume_test():
    from dogo.core.registry import BACKBONES
    families = {arch.rstrip("0123456789").split("_")[0] for arch in RESUME_ARCHS}
    assert all(name.rstrip("0123456789").split("_")[0] in families for name in BACKBONES)


@pytest.mark.parametrize("arch", RESUME_ARCHS)
def test_mid_epoch_resume_is_bit_exact_for_every_backbone(arch, shapes, tmp_path):
    """2 steps, a checkpoint, a fresh trainer resuming it mid-epoch and 2 more steps equal 4 steps straight, in every
    tensor and in the torch RNG state (EfficientNet's stochastic depth and MobileNet's dropout draw from it)."""
    import torch

    from dogo.engine.run.trainer import Trainer, train

    # loader worker processes for the first architecture only: their resume does not depend on the backbone, and
    # starting them costs each run a second
    workers = 1 if arch == RESUME_ARCHS[0] else 0

    def one_peer(folder, **sections):
        raw = tiny_config(shapes, tmp_path / folder, schedule={"max_steps": 4}, data={"workers": workers}, **sections)
        raw["peers"] = {"a": {"arch": arch, "head_hidden": 16, "head_out": 8, "tau": 0.5}}
        raw["objective"] = {"name": "simclr"}
        return config_mod.from_dict(raw)

    straight = one_peer("straight")
    train(straight)
    first = one_peer("resumed", checkpoint={"every_steps": 2})
    stop_at = 2
    trainer = Trainer(first)
    real = trainer._after_step

    def stop_after_two(batch, log, stop, result):
        done = real(batch, log, stop, result)
        if trainer.pos.step == stop_at:
            raise KeyboardInterrupt  # a kill right after the step-2 checkpoint
        return done

    trainer._after_step = stop_after_two
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    train(one_peer("resumed"))
    a = checkpoint_files.load(checkpoint_files.latest(straight.run_dir))
    b = checkpoint_files.load(checkpoint_files.latest(first.run_dir))
    assert a["position"] == b["position"] and a["position"]["step_in_epoch"] == 4
    for name, t in a["peers"]["a"].items():
        assert torch.equal(t, b["peers"]["a"][name]), f"{arch}: {name} differs after the resume"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]), f"{arch}: the torch RNG state differs"


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_named_and_leaves_the_previous_one(shapes, tmp_path):
    """A real failed write (a file-size limit makes write() fail, as a full disk does): one line naming the file,
    the earlier checkpoint still loads, no temporary file stays."""
    import subprocess
    import sys

    from tests.helpers import REPO, cli_env, dogo
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path, schedule={"max_steps": 2},
                                                         checkpoint={"every_steps": 1}))
    run_dir = tmp_path / "t"
    limited = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
               "from dogo.cli import main; sys.exit(main(sys.argv[1:]))")
    assert dogo("train", path, "schedule.max_steps=1") == 0  # the limited run below needs a process of its own
    first = checkpoint_files.latest(run_dir)
    proc = subprocess.run([sys.executable, "-c", limited, "train", str(path)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    said = " ".join(proc.stdout.split())
    assert proc.returncode == 2 and "could not write checkpoint" in said and "step_000000002.pt" in said, said
    assert f"the newest checkpoint is still {first}" in said
    assert checkpoint_files.latest(run_dir) == first
    checkpoint_files.load(first)  # still a whole checkpoint
    assert not list(checkpoint_files.folder(run_dir).glob(".*.tmp"))


def test_a_symlink_loop_in_a_dataset_is_skipped_and_reported(shapes, tmp_path):
    """`OSError: Too many levels of symbolic links` from a link pointing at itself, and a dangling link: the scan
    goes on, names both, and the loaders and the converter report them."""
    import shutil

    from dogo.pipelines.imagefolder import scan
    root = tmp_path / "train"
    shutil.copytree(shapes / "train", root)
    (root / "circle" / "loop.jpg").symlink_to(root / "circle" / "loop.jpg")
    (root / "star" / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")
    (root / "loopdir").symlink_to(root / "loopdir")
    index = scan(root)
    assert len(index) == 80
    reasons = " ".join(index.skipped)
    assert "loop.jpg" in reasons and "gone.jpg" in reasons and "loopdir" in reasons
    assert "symbolic links" in reasons or "Too many levels" in reasons
    from dogo.engine.run.trainer import train
    cfg = config_mod.from_dict(tiny_config(root.parent, tmp_path / "runs", schedule={"max_steps": 1}))
    train(cfg)
    events = (cfg.run_dir / "metrics.jsonl").read_text()
    assert "loop.jpg" in events and "gone.jpg" in events


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(shapes, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path, device="cuda"))
    with pytest.raises(ConfigError, match="device=cuda but torch sees no CUDA device"):
        config_mod.load(path)


def test_each_undecodable_file_is_counted_once_over_workers_and_epochs(shapes, tmp_path):
    """Issue 32 G8: 20 bad files read by 2 worker processes over 2 epochs are 20 skipped files, not 32."""
    import shutil

    from tests.test_data import folder_loader
    root = tmp_path / "train"
    shutil.copytree(shapes / "train", root)
    for i in range(20):
        (root / "circle" / f"bad{i:02d}.jpg").write_bytes(b"not a jpeg at all")
    loader = folder_loader(root, batch=20, workers=2)
    for epoch in range(2):
        loader.set_epoch(epoch)
        reported = [f for batch in loader for f in batch.skipped]
        assert len(reported) == (20 if epoch == 0 else 0), reported  # each is logged when first met
    assert len(loader.skipped) == 20
    line = loader.skipped[0]  # the path once, and a reason a person can read (not PIL's BytesIO object)
    assert line.count("bad") == 1 and line.endswith(": not an image PIL can read"), line


def test_images_beside_the_class_folders_are_named_and_reported(shapes, tmp_path):
    """Issue 32 A16 and A11c: train/stray.jpg belongs to no class: a warning names it, training reports it with the
    skipped files, and convert's report lists it and the entries it could not list (links to nothing, loops)."""
    import json
    import shutil

    from dogo.pipelines.imagefolder import scan
    root = tmp_path / "train"
    shutil.copytree(shapes / "train", root)
    shutil.copy(next((root / "circle").iterdir()), root / "stray.jpg")
    (root / "star" / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")
    (root / "circle" / "loop.jpg").symlink_to(root / "circle" / "loop.jpg")
    with pytest.warns(UserWarning, match=r"1 image\(s\) lie beside the class folders.*stray.jpg"):
        index = scan(root)
    assert {p.rsplit("/", 1)[1] for p, _ in index.unlisted} == {"stray.jpg", "gone.jpg", "loop.jpg"}
    pytest.importorskip("ffcv", reason="the ffcv extra is not installed")
    from dogo.pipelines.convert import ConvertOptions, convert, sidecar
    dst = tmp_path / "t.beton"
    with pytest.warns(UserWarning, match="stray.jpg"):
        report = convert(root, dst, ConvertOptions(num_workers=1), log=None)
    written = json.loads(sidecar(dst, "report").read_text())
    assert report["skipped"] == written["skipped"] == 3 and report["images_written"] == 80
    assert {f["path"].rsplit("/", 1)[1] for f in written["skipped_files"]} == {"stray.jpg", "gone.jpg", "loop.jpg"}


@pytest.mark.slow
def test_eval_of_a_checkpoint_outside_a_run_folder_writes_beside_it(shapes, tmp_path):
    """Issue 32 G9: `dogo eval knn /path/ck/my.pt` wrote /path/knn.json (the file's grandparent), replacing what
    was there; a run's checkpoint still writes RUN/knn.json."""
    import shutil

    from dogo.engine.run.trainer import train
    from tests.helpers import dogo
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 1}))
    train(cfg)
    (tmp_path / "elsewhere" / "ck").mkdir(parents=True)
    mine = tmp_path / "elsewhere" / "ck" / "my.pt"
    shutil.copy(checkpoint_files.latest(cfg.run_dir), mine)
    keep = tmp_path / "elsewhere" / "knn.json"
    keep.write_text("someone else's")
    assert dogo("eval", "knn", mine) == 0
    assert keep.read_text() == "someone else's" and (mine.parent / "my.knn.json").is_file()
    assert dogo("eval", "knn", cfg.run_dir) == 0
    assert (cfg.run_dir / "knn.json").is_file()


def test_evaluation_labels_come_from_the_training_splits_class_list(shapes, tmp_path):
    """Issue 32 G5: train a/b/c and val b/c numbered each split's own classes from 0, so kNN compared 'b' in val
    with 'a' in train (0.00% instead of 100%). Every split takes the training split's list; a val class the training
    split lacks is an error naming it."""
    import shutil

    from dogo.pipelines import open_eval_split
    from dogo.core.errors import DataError
    root = tmp_path / "data"
    shutil.copytree(shapes / "train", root / "train")
    shutil.copytree(shapes / "val", root / "val")
    classes = sorted(p.name for p in (root / "train").iterdir())
    shutil.rmtree(root / "val" / classes[0])  # val lacks the first class
    data = config_mod.from_dict(tiny_config(root, tmp_path)).data
    train, val = (open_eval_split(data, s, 0) for s in ("train", "val"))
    assert val.classes == train.classes == classes
    b = classes.index(classes[1])
    assert all(int(label) == classes.index(path.split("/")[-2])
               for path, label in zip(val.index.paths, val.index.labels)) and b == 1
    (root / "val" / "unseen").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) unseen are not classes of the training split"):
        open_eval_split(data, "val", 0)


@pytest.mark.slow
def test_a_lock_held_only_by_an_orphan_of_a_killed_run_is_taken_over(shapes, tmp_path):
    """Issue 32 D1b: kill -9 of a run left its DataLoader worker holding the inherited lock for seconds, and a
    resume then was refused. The lock names the main process; once that process is dead the lock is taken over."""
    import json
    import signal
    import subprocess
    import sys

    from tests.helpers import REPO, dogo
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path, schedule={"max_steps": 1}))
    run_dir = tmp_path / "t"
    # the "run": takes the lock, forks a child that inherits it (as a DataLoader worker does) and outlives it
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; from dogo.engine.run.checkpoint import RunLock; RunLock(sys.argv[1])\n"
        "if os.fork() == 0:\n    time.sleep(60); os._exit(0)\n"
        "print('held', flush=True); time.sleep(60)"), str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    try:
        assert dogo("train", path) == 0
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert {"event": "lock_taken_over", "pid": str(holder.pid)} in events
    finally:
        subprocess.run(["pkill", "-f", f"RunLock\\(sys.argv\\[1\\]\\).*{run_dir}"], check=False)
        subprocess.run(["pkill", "-f", str(run_dir)], check=False)


@pytest.mark.slow
def test_workers_die_with_their_parent(tmp_path):
    """die_with_parent (the DataLoader workers' init, convert's writers): a worker whose parent is killed with -9
    is gone at once, instead of lingering with the run's files open."""
    import subprocess
    import sys
    import time

    from tests.helpers import REPO
    marker = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\nfrom dogo.pipelines.base import die_with_parent\n"
        "if os.fork() == 0:\n    die_with_parent(); open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)\n"
        "time.sleep(60)"), str(marker)], cwd=REPO)
    while not marker.exists() or not marker.read_text():
        time.sleep(0.05)
    child = int(marker.read_text())
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, 9)
    pytest.fail("the worker outlived its killed parent")


@pytest.mark.slow
def test_file_system_failures_are_one_line_naming_the_file(shapes, tmp_path, capsys):
    """Issue 32 G6 and G7: metrics.jsonl that cannot grow (a full disk; here a file-size limit, as tmpfs mounts are
    not allowed everywhere), an out_dir that is a file, an export destination inside a file: exit 2 and one line
    naming the file and what to do, no traceback."""
    import resource
    import signal
    import subprocess
    import sys

    from dogo.engine.run.trainer import train
    from tests.helpers import REPO, cli_env, dogo
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 1}))
    train(cfg)
    # G6: the metrics file at the size limit, so that the next line cannot be appended
    metrics = cfg.run_dir / "metrics.jsonl"
    with open(metrics, "a") as f:  # larger than the other files a run writes before its first metrics line
        f.write('{"event": "padding"}\n' * 4000)
    limit = metrics.stat().st_size + 10

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 3}))
    proc = subprocess.run([sys.executable, "-m", "dogo", "train", str(path)], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2 and "Traceback" not in out and "metrics.jsonl: File too large" in out, out
    # G7: out_dir is a file; an export into a path whose folder is a file
    (tmp_path / "afile").write_text("x")
    # (the size limit needed a process of its own; these two run in this one)
    capsys.readouterr()
    code = dogo("train", path, f"out_dir={tmp_path / 'afile'}")
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2 and "afile" in out and "choose another path" in out, out
    code = dogo("export", cfg.run_dir, "--peer", "a", tmp_path / "afile" / "bb.pt")
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2 and "afile" in out, out


@pytest.mark.slow
def test_decoding_the_largest_allowed_image_fits_four_workers_in_a_third_of_24_GB(tmp_path):
    """Issue 32 A14b: a 20000 x 20000 PNG at the old 400 M-pixel limit peaked at 7.75 GB in load_rgb (a whole-image
    copy per step), so 4 workers could exceed a 24 GB machine. The peak per pixel, measured on a 20 M-pixel PNG in a
    fresh process, times the limit and 4 workers (data.workers' default) stays within 8 GB."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from dogo.pipelines.images import MAX_PIXELS
    from tests.helpers import REPO
    pixels = np.zeros((4000, 5000, 3), np.uint8)
    pixels[::7] = 200
    Image.fromarray(pixels).save(tmp_path / "big.png")
    probe = ("import resource, sys\nfrom dogo.pipelines.images import load_rgb\n"
             "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nx = load_rgb(sys.argv[1])\n"
             "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / (x.shape[0] * x.shape[1]))")
    per_pixel = float(subprocess.run([sys.executable, "-c", probe, str(tmp_path / "big.png")], cwd=REPO,
                                     capture_output=True, text=True, check=True).stdout)
    assert per_pixel * MAX_PIXELS * 4 <= 8e9, per_pixel


def test_a_jpeg_with_a_zero_filled_block_is_refused_everywhere(shapes, tmp_path):
    """Issue 32 A15: a zero-filled block mid-file breaks no JPEG structure; libjpeg decodes the rest as noise and
    only warns on stderr ("Corrupt JPEG data ..."), naming no file. Its warning counts as a decode error: the file
    is skipped and reported by the folder backend, by convert, and by DALI's scan."""
    import io
    import shutil

    import numpy as np
    from PIL import Image

    from dogo.pipelines.images import load_rgb
    from tests.test_data import folder_loader
    rng = np.random.default_rng(0)
    pixels = (rng.random((256, 256, 3)) * 60 + np.linspace(0, 180, 256)[None, :, None]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    data[len(data) // 2:len(data) // 2 + 300] = bytes(300)
    root = tmp_path / "train"
    shutil.copytree(shapes / "train", root)
    bad = root / "circle" / "zeroed.jpg"
    bad.write_bytes(bytes(data))
    for draft in (False, True):
        with pytest.raises(ValueError, match=r"zeroed.jpg: corrupt JPEG data \(libjpeg: Corrupt JPEG data"):
            load_rgb(str(bad), draft_only=draft)
    loader = folder_loader(root, batch=81)
    assert [line.split(": ", 1)[0] for line in next(iter(loader)).skipped] == [str(bad)]
    pytest.importorskip("ffcv", reason="the ffcv extra is not installed")
    from dogo.pipelines.convert import ConvertOptions, convert
    report = convert(root, tmp_path / "t.beton", ConvertOptions(num_workers=1), log=None)
    assert [f["path"] for f in report["skipped_files"]] == [str(bad)] and report["images_written"] == 80
    pytest.importorskip("nvidia.dali", reason="the dali extra is not installed")
    from dogo.pipelines.backends.dali_loader import _undecodable
    from dogo.pipelines.imagefolder import scan
    assert [p for p, _ in _undecodable(scan(root).paths, 2, whole=True)] == [str(bad)]
