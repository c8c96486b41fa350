"""The summary table of `make gpu-check`: every figure from the result files of one check's folder, one row each.

python -m dogo.benchmarks.gpu_summary benchmarks/results/gpu_<device>_<date>/ prints it and writes summary.json
beside the results; a step that failed, timed out or was skipped says so in its row.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from dogo.benchmarks.launches import launch_text


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps(folder: Path) -> dict[str, tuple[str, str]]:
    out = {}
    try:
        for line in (folder / "steps.log").read_text().splitlines():
            name, status, seconds = line.split("\t")
            out[name] = (status, seconds)
    except (OSError, ValueError):
        pass
    return out


def _utilisation(folder: Path) -> dict[str, str]:
    """Mean and max GPU busy % while each CIFAR-sized config ran (nvidia-smi samples, 'end NAME' after each)."""
    out, samples = {}, []
    try:
        lines = (folder / "gpu_util_cifar.csv").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        if line.startswith("end "):
            if samples:
                out[line[4:]] = f"{sum(samples) / len(samples):.0f}% mean, {max(samples):.0f}% max"
            samples = []
        elif line.strip().isdigit():
            samples.append(float(line))
    return out


def _train_rows(r: dict, label: str, busy: str | None = None) -> list[tuple[str, str]]:
    whole, engine = r["step_with_batch_and_augmentation"], r["engine_only"]
    ceiling, ratios = r.get("plain_model_ceiling"), r.get("ratios", {})
    rows = [(f"{label}: images/s whole / engine / ceiling",
             f"{whole['images_per_s_median']:,.0f} / {engine['images_per_s_median']:,.0f} / "
             + (f"{ceiling['images_per_s_median']:,.0f}" if ceiling else "n/a")),
            (f"{label}: whole/engine, whole/ceiling",
             f"{ratios.get('whole_to_engine', float('nan')):.3f}, {ratios.get('whole_to_ceiling', float('nan')):.3f}"),
            (f"{label}: MFU, ops per step",
             (f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a") + f", {r['ops_per_step']}"),
            (f"{label}: CUDA graphs, launches per step",
             f"{r.get('cuda_graphs', 'off')}, " + (launch_text(r["launches_per_step"]) if "launches_per_step" in r
                                                    else f"{r['ops_per_step']} (aten ops)")),
            (f"{label}: memory estimate / measured peak",
             f"{r['memory']['estimate_bytes'] / 2 ** 30:.1f} / {r['memory']['measured_peak_bytes'] / 2 ** 30:.1f} GiB"),
            (f"{label}: host syncs", "n/a (CPU)" if r.get("sync_warnings") is None
             else (", ".join(r["sync_warnings"]) or "none"))]
    eager = r.get("eager")
    if eager:  # the same step with cuda_graphs=off, measured in the same process
        rows.append((f"{label}: eager images/s whole / engine; graphs speed-up",
                     f"{eager['step_with_batch_and_augmentation']['images_per_s_median']:,.0f} / "
                     f"{eager['engine_only']['images_per_s_median']:,.0f}; "
                     f"{eager['graphs_speedup_step_with_batch_and_augmentation']:.2f}x / "
                     f"{eager['graphs_speedup_engine_only']:.2f}x, {launch_text(eager['launches_per_step'])}"))
    if busy:
        rows.append((f"{label}: GPU busy", busy))
    return rows


def summary(folder: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    env = _load(folder, "environment.json")
    if env:
        rows.append(("device", f"{env.get('gpu') or 'CPU (rehearsal)'} x{env.get('gpus', 0)}, driver "
                               f"{env.get('driver') or 'n/a'}, {env.get('cpu_cores')} cores"))
        rows.append(("versions", f"torch {env['torch']} (CUDA {env.get('cuda')}), torchvision {env['torchvision']}, "
                                 f"numpy {env['numpy']}"))
    busy = _utilisation(folder)
    for name, label in (("train_r18_r50.json", "DoGo R18+R50 224px"),
                        ("train_cifar10_simclr_r18.json", "CIFAR SimCLR R18 32px"),
                        ("train_cifar10_r18_r50.json", "CIFAR DoGo R18+R50 32px")):
        r = _load(folder, name)
        if r:
            rows += _train_rows(r, label, busy.get(name[len("train_"):-len(".json")]))
    for dtype in ("fp32", "bf16"):
        r = _load(folder, f"loss_{dtype}.json")
        for row in (r or {}).get("results", []):
            k, s = row.get("kernel", {}), row.get("straightforward", {})
            time_ratio = row.get("time_ratio")
            rows.append((f"loss {dtype}, {row['views']:,} views, tile {k.get('tile', r['tile_images'])}: kernel / straightforward",
                         f"{k.get('seconds_median', float('nan')):.4f} s / "
                         + (f"{s['seconds_median']:.4f} s ({time_ratio:.2f}x time, "
                            f"{row['memory_ratio']:.4f}x memory)" if "seconds_median" in s else
                            s.get("skipped", "not run"))))
    r = _load(folder, "recipe.json")
    if r:
        per = lambda key: (f"{1e6 * r[key]['seconds_per_image_per_view']:.2f} us" if key in r else "n/a")
        rows.append(("device recipe per image per view: eager / compiled",
                     f"{per('device_recipe_eager')} / {per('device_recipe_compiled')}; "
                     f"{r['device_recipe_traffic_fp16']['bytes_per_image_per_view'] / 1e6:.1f} MB moved, "
                     f"{r['device_recipe_eager'].get('ops_per_view', 'n/a')} ops"))
    r = _load(folder, "pipeline_folder.json")
    if r:
        rows.append(("folder backend, recipe on device: images/s",
                     f"{r['backend_two_views']['images_per_s']:,.0f} ({r['ratio_to_torchvision']:.2f}x torchvision, "
                     f"{r['ratio_to_decode_ceiling']:.2f}x the decode-only ceiling)"))
    r = _load(folder, "ddp_sigterm.json")
    if r:
        rows.append(("torchrun SyncBN, SIGTERM",
                     f"{r['ranks']} rank(s): stopped and saved at step {r['stopped_at']}, resumed to {r['resumed_to']}"))
    r = _load(folder, "cifar_table.json")
    for row in (r or {}).get("rows", []):
        rows.append((f"CIFAR photos: {row['model']}", f"kNN {row['knn_top1']:.1f}, linear {row['linear_top1']:.1f}"))
    r = _load(folder, "demo_knn.json")
    if r:
        rows.append(("make demo kNN (trained vs random init)",
                     ", ".join(f"{name} {p['trained']:.1f} vs {p['random_init']:.1f}" for name, p in r["peers"].items())))
    for name, (status, seconds) in _steps(folder).items():
        rows.append((f"step {name}", f"{status}, {seconds} s"))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dogo.benchmarks.gpu_summary RESULT_FOLDER")
        return 2
    folder = Path(argv[0])
    rows = summary(folder)
    (folder / "summary.json").write_text(json.dumps(dict(rows), indent=1) + "\n")
    width = max((len(k) for k, _ in rows), default=0)
    print(f"== gpu-check summary ({folder})")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    failed = [k for k, v in rows if k.startswith("step ") and not (v.startswith("ok") or v.startswith("skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
