"""The study engine (benchmarks/study.py): a study file read strictly, a tiny two-arm study (a SimCLR ResNet-20 and a
DisCo student of its run) trained, evaluated and merged end to end on the CPU, the table's numbers those of the arm
files, and every shipped study's arms loading as configs."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from dogo.benchmarks import study as S
from dogo.engine import config as config_mod
from dogo.core.errors import ConfigError
from tests.helpers import REPO, dogo


def _folder(root: Path, train=48, val=20) -> Path:
    """32 px PNG images in train/ and val/ class folders (four classes)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            folder = root / split / f"c{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def _tiny_study(tmp_path: Path) -> Path:
    small_head = ["peers.r20.head_hidden=16", "peers.r20.head_out=8"]
    spec = {
        "name": "tiny", "epochs": 2, "batch_size": 16, "seeds": [0], "knn_every_epochs": 1,
        "baselines": ["resnet20"],
        "overrides": ["device=cpu", "data.image_size=16", "data.workers=0", "log.progress=off",
                      "log.tensorboard=off", "eval.batch_size=64"],
        "arms": {
            "simclr_r20": {"config": str(REPO / "configs" / "cifar10_simclr_r20.yaml"), "overrides": small_head},
            "disco_r20": {"config": str(REPO / "configs" / "cifar10_disco_r20_from_r56.yaml"), "teacher": "simclr_r20",
                          "overrides": [*small_head, "teacher.peer=r20"]},
        },
        "published": [{"arm": "simclr_r20", "figure": "kNN 12.3 elsewhere"}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_tiny_study_runs_end_to_end_and_its_table_comes_from_the_arm_files(tmp_path):
    data, out = _folder(tmp_path / "data"), tmp_path / "out"
    study_file = _tiny_study(tmp_path)
    # the student first: its teacher is added and trained before it
    assert dogo("study", "run", str(study_file), "--out", str(out), "--data", str(data), "--arms", "disco_r20") == 0
    for name in ("simclr_r20_s0.json", "disco_r20_s0.json", "baselines_s0.json", "table.json", "table.md",
                 "knn_curves.png"):
        assert (out / name).is_file(), name
    arms = {a: json.loads((out / f"{a}_s0.json").read_text()) for a in ("simclr_r20", "disco_r20")}
    teacher_run = out / "runs" / "simclr_r20_s0"
    assert f"teacher.checkpoint={teacher_run}" in arms["disco_r20"]["overrides"]
    for record in arms.values():
        assert record["steps"] == 6 and record["images_seen"] == 96 and record["epochs"] == 2.0  # 48 images / 16
        assert record["bank_images"] == 48 and record["val_images"] == 20
        assert [p["epoch"] for p in record["knn_curve"]] == [1, 2]  # the monitor's points, the last at the end
        assert record["knn_curve"][-1]["top1"]["r20"] == record["knn"]["r20"]["dino"]  # the same split, preset
        assert record["device_seconds"] == record["train_seconds"] + record["eval_seconds"] > 0
        # the run's own clock (summed over its sessions, a killed one's up to its last checkpoint)
        done = json.loads((Path(record["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])
        assert done["event"] == "done" and record["train_seconds"] == pytest.approx(done["run_seconds"], abs=1.0)
        assert record["device_seconds_are"] == "CPU wall seconds" and record["environment"]["device"] == "cpu"
    table = json.loads((out / "table.json").read_text())
    rows = {r["arm"]: r for r in table["rows"]}
    for arm, record in arms.items():
        assert rows[arm]["knn_dino"]["values"] == [record["knn"]["r20"]["dino"]]
        assert rows[arm]["knn_lightly"]["mean"] == record["knn"]["r20"]["lightly"]
        assert rows[arm]["device_seconds"]["mean"] == record["device_seconds"]
    assert [b["model"] for b in table["baselines"]] == ["raw pixels", "resnet20 random init"]
    assert "kNN 12.3 elsewhere" in (out / "table.md").read_text()

    # a second seed's file, made here from the first with other numbers: the table is their mean and spread
    other = dict(arms["simclr_r20"], seed=1, knn={"r20": {"dino": 10.0, "lightly": 20.0}})
    (out / "simclr_r20_s1.json").write_text(json.dumps(other))
    assert dogo("study", "table", str(out), "--study", str(study_file)) == 0
    row = next(r for r in json.loads((out / "table.json").read_text())["rows"] if r["arm"] == "simclr_r20")
    first = arms["simclr_r20"]["knn"]["r20"]["dino"]
    assert row["seeds"] == [0, 1] and row["knn_dino"]["mean"] == pytest.approx((first + 10.0) / 2)
    assert row["knn_dino"]["sd"] == pytest.approx(abs(first - 10.0) / np.sqrt(2))
    assert f"{(first + 10.0) / 2:.2f} +- " in (out / "table.md").read_text()

    # a finished arm is not run again
    before = (out / "disco_r20_s0.json").stat().st_mtime_ns
    assert dogo("study", "run", str(study_file), "--out", str(out), "--data", str(data), "--seeds", "0") == 0
    assert (out / "disco_r20_s0.json").stat().st_mtime_ns == before


def test_a_student_without_its_finished_teacher_is_refused(tmp_path):
    study = S.load_study(_tiny_study(tmp_path))
    with pytest.raises(ConfigError, match="learns from arm simclr_r20's run .seed 0., which has not finished"):
        S.run_arm(study, "disco_r20", 0, out=tmp_path / "out")


def test_study_files_are_read_strictly(tmp_path):
    good = yaml.safe_load(_tiny_study(tmp_path).read_text())

    def load(**change):
        spec = {**good, **change}
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return S.load_study(path)

    assert list(load().arms) == ["simclr_r20", "disco_r20"]
    with pytest.raises(ConfigError, match="unknown key 'seed'; did you mean 'seeds'"):
        load(seed=[0])
    with pytest.raises(ConfigError, match="epochs or as steps"):
        load(steps=10)
    arms = {**good["arms"], "disco_r20": {**good["arms"]["disco_r20"], "teacher": "simclr_r2"}}
    with pytest.raises(ConfigError, match="'simclr_r2' is not an arm of the study; did you mean 'simclr_r20'"):
        load(arms=arms)
    arms = {"a": {"config": good["arms"]["simclr_r20"]["config"], "teacher": "b"},
            "b": {"config": good["arms"]["simclr_r20"]["config"], "teacher": "a"}}
    with pytest.raises(ConfigError, match="come back to it"):
        load(arms=arms)
    with pytest.raises(ConfigError, match="does not exist"):
        load(arms={"a": {"config": "nowhere.yaml"}})


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("study_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_study_arm_loads_as_a_config(path, tmp_path):
    study = S.load_study(path)
    for name, arm in study.arms.items():
        cfg = config_mod.load(arm.config, S.arm_overrides(study, arm, study.seeds[0], tmp_path, None, ("device=cpu",)))
        assert cfg.data.batch_size == study.batch_size and cfg.eval.knn_bank_images == 0
        if study.epochs:
            assert (cfg.schedule.epochs, cfg.schedule.max_steps) == (study.epochs, 0)
        else:  # an arm may set its own steps (configs/study_multicrop_cifar10_cpu.yaml: equal time, not images)
            own = [o.split("=")[1] for o in arm.overrides if o.startswith("schedule.max_steps=")]
            assert cfg.schedule.max_steps == (int(own[-1]) if own else study.steps)
