"""`make demo-check`'s comparison of a demo's kNN table with the committed result file."""
import copy
import json

from dogo.benchmarks.demo_check import differences, main
from tests.helpers import REPO

COMMITTED = REPO / "benchmarks" / "results" / "demo_knn_cpu2.json"


def test_the_committed_table_equals_itself_and_a_changed_one_does_not(tmp_path):
    committed = json.loads(COMMITTED.read_text())
    assert differences(committed, committed) == []
    same_to_print = copy.deepcopy(committed)
    same_to_print["peers"]["r18"]["trained"] += 0.001  # below the printed two decimals
    assert differences(same_to_print, committed) == []
    changed = copy.deepcopy(committed)
    changed["peers"]["r50"]["trained"] += 0.5
    changed["step"] += 1
    found = differences(changed, committed)
    assert len(found) == 2 and any(d.startswith("r50 trained") for d in found) and found[0].startswith("step")
    (tmp_path / "new.json").write_text(json.dumps(changed))
    assert main([str(tmp_path / "new.json"), str(COMMITTED)]) == 1
    assert main([str(COMMITTED), str(COMMITTED)]) == 0
    assert main([str(tmp_path / "missing.json"), str(COMMITTED)]) == 2
