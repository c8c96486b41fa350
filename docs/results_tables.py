"""The result tables of README.md and docs/, generated from the result files in benchmarks/results/ (as
docs/config.md is from the config's comments): `python docs/results_tables.py` rewrites every region between
`<!-- generated: NAME -->` and `<!-- end generated -->`; `--check` fails when one differs from what its result files
say (tests/test_docs.py). Each table names the files it came from and the code, torch and device that produced them.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
REGION = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end generated -->)", re.S)

# Result files written before environment recorded the code and the CPU's model: the commit that measured them (as
# benchmarks/results/README.md tells each run) and the machine, by file or folder
LEGACY = {"gpu_h200_20261204/run1": ("1388981", None), "gpu_h200_20261204/run2": ("3368e5c", None),
          "demo_knn_cpu2.json": ("4b22aed", "AMD EPYC"), "pipeline_folder_workers_cpu2.json": ("fa04a28", "AMD EPYC"),
          "pipeline_ffcv_workers_cpu2.json": ("fa04a28", "AMD EPYC")}


def _load(relative: str) -> dict:
    return json.loads((RESULTS / relative).read_text())


def provenance(files: list[str]) -> str:
    """'code X, torch Y on DEVICE' for a table's result files (one phrase per distinct machine and code)."""
    phrases = []
    for relative in files:
        env = _load(relative).get("environment", {})
        legacy_code, legacy_cpu = LEGACY.get(relative) or LEGACY.get(str(Path(relative).parent)) or (None, None)
        code = env.get("code") or legacy_code or "not recorded"
        device = env.get("gpu") or f"{env.get('cpu_model') or legacy_cpu or 'a'} CPU, {env.get('cpu_count', '?')} cores"
        phrase = f"code {code}, torch {env.get('torch', '?')}, {device}"
        if phrase not in phrases:
            phrases.append(phrase)
    return "; ".join(phrases)


def _files_line(files: list[str]) -> str:
    """The result files, named by their common folder where they share one beyond benchmarks/results/."""
    folders = {str(Path(f).parts[0]) for f in files}
    if len(folders) == 1 and len(Path(files[0]).parts) > 1:
        return f"`benchmarks/results/{folders.pop()}/`"
    return ", ".join(f"`benchmarks/results/{f}`" for f in files)


def gpu_steps() -> str:
    rows = [("DoGo ResNet-18 + ResNet-50, 224 px, 256 images", "gpu_h200_20261204/run1/train_r18_r50.json"),
            ("SimCLR ResNet-18, CIFAR 32 px, 256 images", "gpu_h200_20261204/run2/train_cifar10_simclr_r18.json"),
            ("DoGo ResNet-18 + ResNet-50, CIFAR 32 px", "gpu_h200_20261204/run2/train_cifar10_r18_r50.json")]
    files = [f for _, f in rows]
    out = [f"Images/s of the training step, bf16 ({_files_line(files)}; {provenance(files)}):", "",
           "| step | whole step | engine only | model alone (ceiling) |", "| --- | --- | --- | --- |"]
    for label, relative in rows:
        r = _load(relative)
        w, e, c = (r[k]["images_per_s_median"] for k in ("step_with_batch_and_augmentation", "engine_only",
                                                          "plain_model_ceiling"))
        out.append(f"| {label} | {w:,.0f} | {e:,.0f} | {c:,.0f} |")
    return "\n".join(out) + "\n"


def pipelines() -> str:
    files = ["pipeline_folder_workers_cpu2.json", "pipeline_ffcv_workers_cpu2.json"]
    out = [f"Input pipelines, two views of the ImageNet recipe at 224 px on 2 CPU workers ({_files_line(files)}; "
           f"{provenance(files)}):", "", "| backend | images/s | vs torchvision in the same run |", "| --- | --- | --- |"]
    for relative in files:
        r = _load(relative)
        out.append(f"| {r['backend']} | {r['backend_two_views']['images_per_s']:,.0f} | "
                   f"{r['ratio_to_torchvision']:.1f}x |")
    return "\n".join(out) + "\n"


def memory() -> str:
    configs = ["imagenet_r18_r50", "imagenet_simclr_r18", "imagenet_simclr_r50", "disco_r18_from_r50"]
    out = ["| config | images per GPU | estimate per GPU |", "| --- | --- | --- |"]
    for name in configs:
        r = _load(f"memory_{name}_8gpu_bf16.json")
        out.append(f"| `configs/{name}.yaml` | {r['batch_per_rank']} | {r['total_gib']:.1f} GiB |")
    return "\n".join(out) + "\n"


def demo() -> str:
    relative = "demo_knn_cpu2.json"
    r = _load(relative)
    parts = [f"{p['arch'].replace('resnet', 'ResNet-')} {p['trained']:.1f}% (random init {p['random_init']:.1f}%)"
             for p in r["peers"].values()]
    return (f"after {r['step']} steps, {', '.join(parts)} (`benchmarks/results/{relative}`, kNN "
            f"{r.get('knn_protocol', 'dino')} preset; {provenance([relative])}).\n")


def study_cpu() -> str:
    """The CPU study's table (dogo study run configs/study_cifar10_cpu.yaml): every arm's peers and the baselines."""
    folder = "study_cifar10_cpu2"
    table = _load(f"{folder}/table.json")
    files = [f"{folder}/{Path(f).name}" for f in table["arm_files"]]
    first = table["rows"][0]
    out = [f"CIFAR-10, {first['images_seen']:,} images seen per arm (batch {first['batch_size']}), one seed, kNN top-1 "
           f"on the {table['val_images']:,} val photos with all {table['bank_images']:,} training photos as the bank "
           f"(`benchmarks/results/{folder}/`; {provenance(files)}):", "",
           "| model | kNN dino (k=20) | kNN lightly (k=200) | CPU-seconds |", "| --- | --- | --- | --- |"]
    out += [f"| {r['arm']}: {r['arch']} | {_knn(r)} | {_seconds(r['device_seconds'])} |" for r in table["rows"]]
    out += [f"| {b['model']} | {_knn(b)} | |" for b in table["baselines"]]
    return "\n".join(out) + "\n"


def _knn(row: dict) -> str:
    """A study row's two kNN cells (means over its seeds)."""
    return f"{row['knn_dino']['mean']:.1f} | {row['knn_lightly']['mean']:.1f}"


def _seconds(spread: dict | None) -> str:
    return "-" if spread is None else f"{spread['mean']:,.0f}"


def study_multicrop() -> str:
    """Multi-crop against two crops at equal training time (dogo study run configs/study_multicrop_cifar10_cpu.yaml):
    images seen and training seconds per arm, since equal time means unequal images."""
    folder = "study_multicrop_cifar10_cpu2"
    table = _load(f"{folder}/table.json")
    files = [f"{folder}/{Path(f).name}" for f in table["arm_files"]]
    out = [f"CIFAR-10 ResNet-18 (CIFAR stem), batch {table['rows'][0]['batch_size']}, one seed, kNN top-1 on the "
           f"{table['val_images']:,} val photos with the {table['bank_images']:,} training photos as the bank "
           f"(`benchmarks/results/{folder}/`; {provenance(files)}):", "",
           "| arm | images seen | training CPU-seconds | kNN dino (k=20) | kNN lightly (k=200) |",
           "| --- | --- | --- | --- | --- |"]
    out += [f"| {r['arm']} | {r['images_seen']:,} | {_seconds(r['train_seconds'])} | {_knn(r)} |"
            for r in table["rows"]]
    out += [f"| {b['model']} | | | {_knn(b)} |" for b in table["baselines"]]
    return "\n".join(out) + "\n"


TABLES = {"gpu_steps": gpu_steps, "pipelines": pipelines, "memory": memory, "demo": demo, "study_cpu": study_cpu,
          "study_multicrop": study_multicrop}
DOCUMENTS = [REPO / "README.md", REPO / "docs" / "gpu.md", REPO / "docs" / "methods.md"]


def render(text: str) -> str:
    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise KeyError(f"no generated table named {name!r}: one of {', '.join(TABLES)}")
        return m.group(1) + TABLES[name]() + m.group(4)
    return REGION.sub(fill, text)


def main(argv: list[str]) -> int:
    stale = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        new = render(text)
        if new != text:
            stale.append(doc)
            if "--check" not in argv:
                doc.write_text(new)
                print(f"wrote {doc}")
    if stale and "--check" in argv:
        print(f"stale generated tables in {', '.join(map(str, stale))}: run python docs/results_tables.py "
              f"(make docs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
