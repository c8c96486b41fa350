"""Whole runs through the `dogo` command: distributed equivalence under torchrun, kill and resume, signals."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from dogo.core import checkpoint_files
from dogo.engine.run import checkpoint
from tests.helpers import REPO, cli_env, dogo, fork_server, run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow  # every test here starts processes


def metrics(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [l for l in lines if "event" not in l]


def final_peers(run_dir):
    return checkpoint_files.load(checkpoint_files.latest(run_dir))["peers"]


# multi-crop: two 32 px views and two 24 px crops of each image per peer
MULTICROP = {"views": {"global": {"count": 2}, "local": {"count": 2, "size": 24}}}
PLANS = {"two_views": {}, "multicrop": MULTICROP,
         # a DINO peer beside the SimCLR one: its centre (every rank's teacher scores) and momentum teacher too
         "dino_multicrop": {**MULTICROP, "peers": {"a": {"arch": "resnet18", "head_hidden": 32, "head_out": 16,
                                                         "ssl": "dino", "dino": {"prototypes": 64,
                                                                                 "freeze_last_layer_epochs": 0}}}}}
# LARS at 0.05, not the other tests' 0.5: three steps at 0.5 on batch 8 amplify float rounding ~1000x in one step
# (the same one-process run on 1 and 2 intra-op threads ends 1e-3 apart; plain SGD at 0.5 as well). At 0.05 the two
# thread counts agree to 2e-7 while the norms and biases (outside LARS's adaptation, so a gradient off by a factor
# shows there) move by 5e-3. What is left between 1 and 2 ranks is their BatchNorms (torch's native one against
# engine/dist/syncbn.py, each within 2e-5 of float64 at 32 px): 2.5e-5 apart in peer b's weights here.
EXACT = {"weights": {"rtol": 1e-4, "atol": 5e-5}, "loss": {"rel": 5e-5, "abs": 1e-6}}


@pytest.mark.parametrize("plan", list(PLANS))
def test_two_gloo_processes_equal_one_process_with_the_global_batch(shapes, tmp_path, plan):
    """Same images, same augmentations, global-batch loss columns, synced BN: the same run on 1 or 2 ranks, and no
    warning printed by either rank."""
    # 32 px, not the other tests' 16: at 16 px layer3 and layer4 of the ResNet-18 see 1 x 1 maps, and torch's
    # native fp32 BatchNorm backward (the 1-rank run) is off by up to 4e-3 from a float64 reference in peer a's
    # gradients, while the 2-rank run (engine/dist/syncbn.py, two-pass statistics) is within 2e-5 of it. At 32 px both
    # are within 2e-5.
    # the online probe on: its classifiers' gradients are averaged over the ranks, so they match too
    common = {"distributed": {"sync_bn": True}, "schedule": {"max_steps": 3}, "optim": {"name": "lars", "lr": 0.05},
              "eval": {"knn_every_epochs": 0, "online_probe": "on"}, **PLANS[plan]}
    one = tiny_config(shapes, tmp_path / "w1", **common)
    one["data"]["image_size"] = 32
    two = dict(one, out_dir=str(tmp_path / "w2"))
    assert dogo("train", write_config(tmp_path / "one.yaml", one)) == 0  # the one-process run in this one
    proc = run_cli("train", str(write_config(tmp_path / "two.yaml", two)), torchrun_procs=2)
    # issue 46: 24 FutureWarnings under torchrun (torch 2.14's renamed collectives); SyncBN and the probe on here
    assert not re.search(r"\w+Warning: ", proc.stdout + proc.stderr), proc.stdout + proc.stderr
    m1, m2 = metrics(tmp_path / "w1" / "t"), metrics(tmp_path / "w2" / "t")
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2, 3]
    own = "a/dino" if plan.startswith("dino") else "a/ntxent"
    for a, b in zip(m1, m2):
        for key in ("loss", own, "a/kl", "b/ntxent", "b/kl", "probe/a/loss", "probe/b/loss"):
            assert a[key] == pytest.approx(b[key], **EXACT["loss"]), (a["step"], key)
    s1, s2 = (checkpoint_files.load(checkpoint_files.latest(tmp_path / w / "t"))["targets"]["method_states"]
              for w in ("w1", "w2"))
    assert s1.keys() == s2.keys() and (("a.center" in s1) == plan.startswith("dino"))
    for name, t in s1.items():
        if t.is_floating_point():
            torch.testing.assert_close(s2[name], t, **EXACT["weights"], msg=f"method state {name}")
    p1, p2 = final_peers(tmp_path / "w1" / "t"), final_peers(tmp_path / "w2" / "t")
    for peer in ("a", "b"):
        for name, t in p1[peer].items():
            if t.is_floating_point():
                torch.testing.assert_close(p2[peer][name], t, **EXACT["weights"], msg=f"{peer}.{name}")
    c1, c2 = (checkpoint_files.load(checkpoint_files.latest(tmp_path / w / "t"))["online_probe"]["classifiers"]
              for w in ("w1", "w2"))
    for name, t in c1.items():
        torch.testing.assert_close(c2[name], t, rtol=1e-4, atol=1e-5, msg=f"online probe {name}")


# DoGo with a MoCo v2 peer and a SimSiam peer: the key encoder, the queue and the predictor resume too.
MIXED_PEERS = {"peers": {"a": {"arch": "resnet18", "head_hidden": 32, "head_out": 16, "ssl": "mocov2", "mocov2": {"queue_size": 40}},
                         "b": {"arch": "resnet18", "head_hidden": 32, "head_out": 16, "ssl": "simsiam", "simsiam": {"pred_hidden": 8}}}}


_HEAD = {"arch": "resnet18", "head_hidden": 32, "head_out": 16}
PAIRS = {  # each method's state (momentum encoders, queues, predictors) resumes too
    "dogo": {},
    "dogo_mocov2_simsiam": MIXED_PEERS,
    "dogo_byol_vicreg": {"peers": {"a": {**_HEAD, "ssl": "byol", "byol": {"pred_hidden": 8}},
                                   "b": {**_HEAD, "ssl": "vicreg"}}},
    "dogo_barlowtwins_simclr": {"peers": {"a": {**_HEAD, "ssl": "barlowtwins"}, "b": {**_HEAD, "tau": 0.5}}},
    # a plan of views: two 16 px views and two 8 px crops per peer, the KL over their five pairs
    "dogo_multicrop": {"views": {"global": {"count": 2}, "local": {"count": 2, "size": 8}}},
}


def _train_and_die_at_the_first_checkpoint(config_path: str) -> None:
    """`dogo train CONFIG` in a process that SIGKILLs itself the moment its first checkpoint stands: a kill at a
    known point, with no race, and no clean-up code run (as with a kill from outside)."""
    import os

    from dogo.cli import main
    torch.set_num_threads(1)  # as the runs in the test's process (tests/helpers.py: dogo)
    save = checkpoint.save

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save = save_then_die
    main(["train", config_path])


@pytest.mark.parametrize("objective", list(PAIRS))
def test_kill_and_resume_is_bit_identical(shapes, tmp_path, objective):
    extra = PAIRS[objective]
    # the killed run in a process of its own, the straight run and the resume in this one
    straight = write_config(tmp_path / "s.yaml", tiny_config(shapes, tmp_path / "straight", **extra))
    assert dogo("train", straight) == 0

    resumed_cfg = tiny_config(shapes, tmp_path / "resumed", checkpoint={"every_steps": 3}, **extra)
    resumed = write_config(tmp_path / "r.yaml", resumed_cfg)
    ckpt3 = tmp_path / "resumed" / "t" / "checkpoints" / "step_000000003.pt"
    killed = fork_server().Process(target=_train_and_die_at_the_first_checkpoint, args=(str(resumed),))
    killed.start()
    killed.join(600)
    assert killed.exitcode == -signal.SIGKILL
    assert checkpoint_files.latest(tmp_path / "resumed" / "t") == ckpt3
    assert dogo("train", resumed) == 0  # resume: auto

    a, b = final_peers(tmp_path / "straight" / "t"), final_peers(tmp_path / "resumed" / "t")
    for peer in a:
        for name, t in a[peer].items():
            assert torch.equal(t, b[peer][name]), f"{peer}.{name} differs after resume"
    sa = checkpoint_files.load(checkpoint_files.latest(tmp_path / "straight" / "t"))
    sb = checkpoint_files.load(checkpoint_files.latest(tmp_path / "resumed" / "t"))
    assert sa["position"] == sb["position"] == {"step": 6, "epoch": 0, "step_in_epoch": 6}
    for k, state in sa["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], sb["optimizer"]["state"][k]["momentum_buffer"])
    keys_a, keys_b = sa["targets"]["method_states"], sb["targets"]["method_states"]
    assert keys_a.keys() == keys_b.keys() and ("mocov2" in objective or "byol" in objective) == bool(keys_a)
    for name, t in keys_a.items():
        assert torch.equal(t, keys_b[name]) if isinstance(t, torch.Tensor) else t == keys_b[name], name


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_saves_a_checkpoint_and_exits_with_its_code(shapes, tmp_path, sig, code):
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP (a dropped ssh session, issue 32 D4): the steps since the last checkpoint
    are saved, then the run exits 128 + the signal's number (issue 46: it exited 0, so a script could not tell an
    interrupted run from a finished one). Its output is a pipe: every line as wide as its content."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 10_000}))
    proc = subprocess.Popen([sys.executable, "-m", "dogo", "train", str(cfg)], cwd=REPO,
                            env=dict(cli_env(), COLUMNS="80"),  # rich's width where it sees no terminal
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "runs" / "t" / "metrics.jsonl"
    while (not log.exists() or '{"step": ' not in log.read_text()) and proc.poll() is None:  # a step: training
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    state = checkpoint_files.load(checkpoint_files.latest(tmp_path / "runs" / "t"))
    assert 1 <= state["position"]["step"] < 10_000
    step = state["position"]["step"]
    assert f"stopped by signal ({sig.name}) at step {step}; checkpoint " in out and f"(exit code {code})" in out, out
    assert any(re.fullmatch(r"step 1/10000 epoch 1/1000  .* lr/a \S+  lr/b \S+", line.rstrip())
               for line in out.splitlines()), out
