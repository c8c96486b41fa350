"""A run that talks (issue 46, item 4): the start banner, the progress bar's epoch and images/s from the first step,
the heartbeat line of a run without a terminal, the end summary, and log lines as wide as their content."""
import json
import re
import shlex

import pytest
import torch

from tests.helpers import dogo, host_sync_guard, tiny_config, write_config


class Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _logger(tmp_path, clock, **kw):
    from dogo.engine.run.logger import MetricsLogger
    # 60 steps of 15 per epoch (4 epochs), 8 images per step, one rank
    return MetricsLogger(tmp_path, True, 60, 0, 8, 1, steps_per_epoch=15, clock=clock, **kw)


def test_the_bars_epoch_and_speed_are_right_from_the_first_step(tmp_path):
    """The bar read "epoch 0" up to step 38 of a 15-steps-per-epoch run and "- img/s" until the first metric line:
    both came from the metric lines (log.every). They come from the host's own counters and clock at every step."""
    clock = Clock()
    log = _logger(tmp_path, clock, progress=True)
    fields = lambda: log.progress.tasks[0].fields
    assert fields()["epoch"] == "1/4" and fields()["speed"] == "-"
    clock.now += 0.5
    with host_sync_guard():  # the bar's bookkeeping reads nothing from the device
        log.step_done(1, 0)
    assert fields() == {"epoch": "1/4", "speed": f"{8 / 0.5:.1f}", "terms": ""}
    for step in range(2, 39):  # 0.25 s per step from here on
        clock.now += 0.25
        log.step_done(step, (step - 1) // 15)
    assert fields()["epoch"] == "3/4"  # step 38 is the 8th step of the third epoch
    # the rate over the last 64 steps (all 38 here): 38 steps of 8 images in 0.5 + 37 * 0.25 s
    assert float(fields()["speed"]) == pytest.approx(38 * 8 / (0.5 + 37 * 0.25), abs=0.05)
    assert log.progress.tasks[0].completed == 38
    log.close()


def test_epoch_labels_and_durations():
    from dogo.engine.run.progress import duration, epoch_label
    assert [epoch_label(e, 15, 60) for e in range(4)] == ["1/4", "2/4", "3/4", "4/4"]
    assert epoch_label(0, 10, 12) == "1/2"  # schedule.max_steps cuts the second epoch short
    assert [duration(s) for s in (0.4, 59.6, 192, 7500)] == ["0 s", "1 min 00 s", "3 min 12 s", "2 h 05 min"]


def test_a_heartbeat_says_what_the_host_knows(tmp_path, capsys):
    """The heartbeat line: step, epoch, images/s and ETA from the host's clock, the loss of the last metric line
    (already read: no new synchronisation), and what the run does while no step finishes."""
    clock = Clock()
    log = _logger(tmp_path, clock, heartbeat_s=30)
    log.beat()
    assert capsys.readouterr().out.strip() == "step 0/60 epoch 1/4  - img/s  ETA -  (waiting for the first step for 0 s)"
    for step in range(1, 6):  # 5 steps, 2 s each: 4 images/s, 0.5 steps/s
        clock.now += 2
        log.add({"loss": torch.tensor(2.5 + step)})
        log.step_done(step, 0)
    log.flush(5, 0, {"a": 0.1})
    capsys.readouterr()
    with host_sync_guard():
        log.beat()
    # 55 steps left at 0.5 steps/s: 110 s
    assert capsys.readouterr().out.strip() == "step 5/60 epoch 1/4  4.0 img/s  ETA 1 min 50 s  loss 5.5000 at step 5"
    clock.now += 40
    log.activity = "evaluating"
    log.beat()
    assert capsys.readouterr().out.strip().endswith("(evaluating, 40 s since the last step)")
    log.activity = None
    log.beat()
    assert capsys.readouterr().out.strip().endswith("(no step finished in the last 40 s)")
    log.close()


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


def test_banner_summary_and_whole_lines(shapes, tmp_path, capsys, monkeypatch):
    """The start banner (run folder, fresh or resumed, images, classes, steps per epoch, total steps), metric lines
    as wide as their content when stdout is not a terminal (rich wrapped them at 80 columns), and the end summary:
    steps, the time of the whole run over its sessions, last loss and kNN, the checkpoint and commands that work."""
    monkeypatch.setenv("COLUMNS", "80")  # what a job log or a pipe gets
    cfg = tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 6}, eval={"knn_every_epochs": 1},
                      log={"every": 2, "progress": "off", "tensorboard": "off"})
    run = tmp_path / "runs" / "t"
    assert dogo("train", write_config(tmp_path / "c.yaml", cfg)) == 0
    out = _lines(capsys.readouterr().out)
    assert out[:4] == [
        f"run folder {run}: a fresh start, 6 steps",
        f"data: 80 images, 10 classes ({shapes / 'train'})",
        "schedule: 10 steps per epoch of 8 images, 6 steps (1 epoch); device cpu, 1 rank",
        "objective dogo: a resnet18 (simclr), b resnet18 (simclr)"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    metric_lines = [line for line in out if line.startswith("step ")]
    assert len(metric_lines) == 3 and all(len(line) > 80 and "lr/b" in line for line in metric_lines), out
    assert metric_lines[0].startswith("step 2/6 epoch 1/1  ")
    knn = [r for r in records if r.get("event") == "knn"][-1]
    done = records[-1]
    assert done["event"] == "done" and done["step"] == 6
    checkpoint = run / "checkpoints" / "step_000000006.pt"
    assert checkpoint.exists()
    summary = out[out.index(next(line for line in out if line.startswith("finished 6 steps in "))):]
    assert summary[1:] == [
        f"last loss {steps[-1]['loss']:.4f} (step 6); kNN top-1 at step 6: a {knn['top1']['a']:.2f}%, "
        f"b {knn['top1']['b']:.2f}%",
        f"checkpoint: {checkpoint}",
        f"next: dogo eval knn {run}",
        f"      dogo eval linear {run} --peer a",
        f"      dogo export {run} a.pt --peer a"]
    first_session = done["run_seconds"]
    assert 0 < done["seconds"] <= first_session
    # the printed export command runs as printed
    monkeypatch.chdir(tmp_path)
    assert dogo(*shlex.split(summary[-1])[1:]) == 0 and (tmp_path / "a.pt").exists()
    capsys.readouterr()

    # a resumed session: the banner says from where; the summary's time covers both sessions
    cfg["schedule"]["max_steps"] = 8
    # (the first session counts up to its checkpoint, which came before its kNN and summary: first_session is more)
    at_checkpoint = torch.load(checkpoint, weights_only=True)["wall_seconds"]
    assert 0 < at_checkpoint <= first_session
    assert dogo("train", write_config(tmp_path / "c.yaml", cfg)) == 0
    out = _lines(capsys.readouterr().out)
    assert out[0] == f"run folder {run}: resumed at step 6 of 8 from {checkpoint}"
    done = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(done["run_seconds"] - (at_checkpoint + done["seconds"])) <= 0.1  # each rounded to 0.1 s
    assert done["run_seconds"] > at_checkpoint and 0 < done["seconds"] < done["run_seconds"]
    finished = next(line for line in out if line.startswith("finished "))
    assert re.fullmatch(r"finished 8 steps in \d+ s \(\d+ s since resuming at step 6\)", finished), finished


def test_a_run_without_a_terminal_prints_a_heartbeat(shapes, tmp_path, capsys, monkeypatch):
    """Without a terminal and with metric lines far apart (log.every), a run printed nothing for minutes. With
    steps of 0.4 s and log.heartbeat_s=0.2, a heartbeat line comes at least every 0.2 s of silence."""
    from dogo.engine.run import trainer as train_mod
    step = train_mod.Trainer.step

    def slow_step(self, batch):
        import time
        time.sleep(0.4)
        return step(self, batch)

    monkeypatch.setattr(train_mod.Trainer, "step", slow_step)
    cfg = tiny_config(shapes, tmp_path, schedule={"max_steps": 4},
                      log={"every": 1000, "progress": "off", "tensorboard": "off", "heartbeat_s": 0.2})
    assert dogo("train", write_config(tmp_path / "c.yaml", cfg)) == 0
    beats = [line for line in _lines(capsys.readouterr().out) if re.match(r"step \d/4 epoch 1/1  ", line)
             and "ETA" in line]
    assert len(beats) >= 4, beats  # about 1.6 s of steps: 8 periods of 0.2 s
    numbers = [int(re.match(r"step (\d)", line).group(1)) for line in beats]
    assert numbers == sorted(numbers) and numbers[-1] >= 3, beats
    assert any(re.search(r"  [\d.]+ img/s  ETA \d+ s", line) for line in beats), beats


def test_no_heartbeat_when_it_is_off(tmp_path, capsys):
    import time
    from dogo.engine.run.logger import MetricsLogger
    log = MetricsLogger(tmp_path, True, 60, 0, 8, 1, steps_per_epoch=15, heartbeat_s=0)
    time.sleep(0.1)
    log.close()
    assert log.heartbeat is None and capsys.readouterr().out == ""


def _signal_on_rank_0(rank: int, world: int, port: int, out):
    """Rank 0 receives SIGTERM between two steps, rank 1 nothing: what each rank's StopRequest says, step by step."""
    import os
    import signal

    import torch.distributed as dist

    from dogo.engine.dist.distributed import DistContext
    from dogo.engine.run.signals import StopRequest
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stop = StopRequest(DistContext(rank, world, rank, torch.device("cpu")))
    said = [stop.should_stop()]
    if rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    said += [stop.should_stop(), stop.should_stop()]
    out[rank] = (said, stop.exit_code, stop.name)
    stop.close()
    dist.destroy_process_group()


def test_every_rank_stops_at_the_same_step_with_the_same_exit_code():
    """A signal that reached one rank stops every rank one step later (the agreement is read a step after it
    starts), and every rank exits with 128 + that signal's number: torchrun and SLURM see one status."""
    from tests.helpers import gloo_ranks
    out = gloo_ranks(_signal_on_rank_0, 2)
    assert out[0] == out[1] == ([False, False, True], 143, "SIGTERM")
