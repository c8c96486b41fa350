"""log.wandb=offline: a run writes a W&B offline run folder (what `wandb sync` uploads) holding the same scalars as
metrics.jsonl and the resolved config; a resumed run continues the same W&B run id."""
import json
import struct

import pytest

pytest.importorskip("wandb", reason="the wandb extra is not installed")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from dogo.engine import config as config_mod  # noqa: E402
from tests.helpers import run_cli, tiny_config, write_config  # noqa: E402

BLOCK, HEADER = 32768, 7  # the .wandb file: LevelDB's log format after a 7-byte header (':W&B', magic, version)


def wandb_records(path) -> list:
    """The protobuf Records of a .wandb file, reassembled from LevelDB log chunks (crc32c, length, type, data)."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", HEADER
    while pos + 7 <= len(raw):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = data if kind in (1, 2) else pending + data  # full/first start a record, middle/last extend it
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def settled_records(path, steps: list[int], timeout: float = 30.0) -> list:
    """The records once the history of `steps` is in the file: W&B's service process writes the file, and on a loaded
    machine (the suite under xdist) it was seen without its history when read right after the run's finish()."""
    import time
    deadline = time.time() + timeout
    while True:
        records = wandb_records(path)
        if sorted(history(records)) == steps or time.time() > deadline:
            return records
        time.sleep(0.5)


def history(records) -> dict[int, dict]:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            out[items["_step"]] = items
    return out


@pytest.mark.slow  # the resume runs the dogo command in a process of its own
def test_an_offline_run_holds_the_scalars_and_config_and_resumes_the_same_run(shapes, tmp_path):
    from dogo.engine.run.trainer import train
    raw = tiny_config(shapes, tmp_path, log={"every": 2, "progress": "off", "wandb": "offline"},
                      eval={"knn_every_epochs": 0, "online_probe": "on"}, schedule={"max_steps": 4, "epochs": 1})
    train(config_mod.from_dict(raw))
    run = tmp_path / "t"
    run_id = (run / "wandb_run_id").read_text().strip()
    [first] = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    records = settled_records(first, [2, 4])
    steps = history(records)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"event"' not in l]
    assert sorted(steps) == [line["step"] for line in lines] == [2, 4]
    for line in lines:  # the same scalars as the log line (W&B stores floats as JSON: equal to the digit)
        assert steps[line["step"]]["loss"] == pytest.approx(line["loss"], rel=1e-6)
        assert "probe/a/top1" in steps[line["step"]]
    probe_step = [s for s in steps.values() if "online_probe_top1/a" in s]
    assert probe_step, "the online probe's val top-1 at the end"
    # the config goes with the run record (and any later config records)
    keys = {u.key for r in records for u in (r.run.config.update if r.WhichOneof("record_type") == "run"
                                             else r.config.update if r.WhichOneof("record_type") == "config" else [])}
    assert {"data", "peers", "objective", "optim"} <= keys

    # resumed to step 6 in a process of its own, as a rerun of the command is: the same W&B id, a second offline
    # folder of it, the steps after the first run's (two W&B runs of one id in one process share W&B's service)
    run_cli("train", str(write_config(tmp_path / "c.yaml", dict(raw, schedule={"max_steps": 6, "epochs": 1}))))
    assert (run / "wandb_run_id").read_text().strip() == run_id
    folders = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(folders) == 2
    assert sorted(history(settled_records(folders[-1], [6]))) == [6]


def test_wandb_off_writes_nothing_and_a_missing_package_is_a_clear_error(shapes, tmp_path, monkeypatch):
    import importlib.util
    from dogo.core.errors import ConfigError
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path))
    assert cfg.log.wandb == "off"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log.wandb=offline needs the wandb package: install the wandb extra"):
        config_mod.check(config_mod.from_dict(tiny_config(shapes, tmp_path, log={"wandb": "offline"})))
