"""The online linear probe: the peers train bit-identically with it on or off, its step has no host sync, its val
top-1 is logged at every epoch end and it resumes with the run; unlabelled data and backends refuse it clearly."""
import json

import pytest
import torch

from dogo.engine import config as config_mod
from dogo.core.errors import ConfigError
from dogo.core import checkpoint_files
from tests.helpers import host_sync_guard, tiny_config


def _trainer(shapes, tmp_path, probe: str, **eval_keys):
    from dogo.engine.run.trainer import Trainer
    raw = tiny_config(shapes, tmp_path / probe, eval={"knn_every_epochs": 0, "online_probe": probe, **eval_keys})
    return Trainer(config_mod.from_dict(raw))


def test_the_peers_train_bit_identically_with_the_probe_on_or_off(shapes, tmp_path):
    weights = {}
    for probe in ("off", "on"):
        trainer = _trainer(shapes, tmp_path, probe)
        batches = iter(trainer.loader)
        for _ in range(3):
            terms = trainer.step(next(batches))
        assert ("probe/a/top1" in terms) == (probe == "on")
        weights[probe] = {f"{n}.{k}": v.clone() for n, p in trainer.model.peers.items()
                          for k, v in p.state_dict().items()}
    assert weights["on"].keys() == weights["off"].keys()
    for key, value in weights["off"].items():
        assert torch.equal(weights["on"][key], value), key


def test_the_probe_learns_without_host_sync(shapes, tmp_path):
    trainer = _trainer(shapes, tmp_path, "on", online_probe_lr=0.5)
    batches = iter(trainer.loader)
    before = {k: v.clone() for k, v in trainer.probe.classifiers.state_dict().items()}
    trainer.step(next(batches))  # the optimisers' state is created in the first step
    batch = next(batches)  # the folder loader decodes on the host: not the step's business
    with host_sync_guard():
        terms = trainer.step(batch)
    after = trainer.probe.classifiers.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert {"probe/a/loss", "probe/a/top1", "probe/b/loss", "probe/b/top1"} <= terms.keys()


def test_val_top1_at_every_epoch_end_and_the_probe_resumes(shapes, tmp_path):
    """80 training images in batches of 8: 10 steps an epoch; 2 epochs, stopped after the first and resumed."""
    from dogo.engine.run.trainer import train
    raw = tiny_config(shapes, tmp_path, eval={"knn_every_epochs": 0, "online_probe": "on"},
                      schedule={"epochs": 2, "max_steps": 0, "warmup_epochs": 0})
    first = dict(raw, schedule={"epochs": 1, "max_steps": 0, "warmup_epochs": 0})
    train(config_mod.from_dict(first))
    run = tmp_path / "t"
    after_one = checkpoint_files.load(checkpoint_files.latest(run))["online_probe"]["classifiers"]
    train(config_mod.from_dict(raw))
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = [e for e in events if e.get("event") == "online_probe"]
    assert [(e["step"], e["epoch"]) for e in probes] == [(10, 1), (20, 2)]
    assert all(set(e["top1"]) == {"a", "b"} and all(0 <= v <= 100 for v in e["top1"].values()) for e in probes)
    assert any("probe/a/top1" in e for e in events if "event" not in e)
    resumed = [e for e in events if e.get("event") == "resume"]
    assert resumed and resumed[0]["step"] == 10
    # the second run continued from the first's classifiers, not from a fresh initialisation
    final = checkpoint_files.load(checkpoint_files.latest(run))["online_probe"]["classifiers"]
    assert not torch.equal(final["a.weight"], after_one["a.weight"])


@pytest.mark.parametrize("changes, message", [
    ({"data": {"backend": "synthetic"}, "eval": {"knn_every_epochs": 0, "online_probe": "on"}},
     "eval.online_probe=on: data.backend=synthetic has no labels"),
    ({"data": {"labels": "none"}, "eval": {"knn_every_epochs": 1}},
     "data.labels=none: eval.knn_every_epochs need labelled images"),
    ({"data": {"labels": "none"}, "eval": {"knn_every_epochs": 0, "online_probe": "on"}},
     "data.labels=none: eval.online_probe=on need labelled images"),
    ({"data": {"backend": "held", "labels": "none"}, "eval": {"knn_every_epochs": 0}},
     "data.labels=none: data.backend=held has no unlabelled mode"),
])
def test_evaluation_without_labels_is_a_clear_error(shapes, tmp_path, changes, message):
    raw = tiny_config(shapes, tmp_path)
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message):
        config_mod.check(config_mod.from_dict(raw))
