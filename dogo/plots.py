"""Pictures of runs and benchmarks (`dogo plot`): training curves from metrics.jsonl, bar charts of result JSON.

matplotlib is imported when a picture is drawn (the Agg backend: no display needed), never at import time.
"""
from __future__ import annotations

import json
import math
import statistics
import warnings
from collections import defaultdict
from pathlib import Path

from dogo.core.io import atomic_write
from dogo.engine.run.logger import read_metrics


class PlotError(ValueError):
    """An input that cannot be drawn; the message names the file and what to do."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("dogo plot needs matplotlib: install the viz extra (make setup, or pip install -e '.[viz]')") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path) -> Path:
    """Write the figure as PNG under a temporary name, then rename: no half-written picture under `out`."""
    out = Path(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    _pyplot().close(fig)
    return out


# ---- training curves ---------------------------------------------------------------------------------------------

def _panels(steps: list[dict]) -> dict[str, list[str]]:
    """Panel title -> metric keys: one panel per loss term kind (ntxent, kl, ...) with every peer in it, the
    total, then the learning rates."""
    panels: dict[str, list[str]] = defaultdict(list)
    for key in steps[-1]:
        if key.startswith("lr/"):
            panels["learning rate"].append(key)
        elif "/" in key:
            panels[key.split("/", 1)[1]].append(key)
    return {"loss (total)": ["loss"], **dict(sorted((k, v) for k, v in panels.items() if k != "learning rate")),
            **({"learning rate": panels["learning rate"]} if "learning rate" in panels else {})}


LINE_STYLES = ("-", "--", ":", "-.")  # one per peer, the same in every panel


def _line_styles(runs: list[tuple[str, list[dict], list[dict]]]) -> tuple[list[str], dict[str, str]]:
    """One colour per run, the same in every panel (matplotlib's cycle, in the order given), and one line style per
    peer ("" for the total), so that a run is one colour wherever it is drawn."""
    colours = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    peers: dict[str, None] = {}
    for _, steps, knn in runs:
        for key in steps[-1]:
            if "/" in key:
                peers[key.split("/")[1 if key.startswith("lr/") else 0]] = None
        for event in knn:
            peers.update(dict.fromkeys(event["top1"]))
    styles = {"": "-", **{peer: LINE_STYLES[i % len(LINE_STYLES)] for i, peer in enumerate(peers)}}
    return [colours[i % len(colours)] for i in range(len(runs))], styles


def curves_figure(runs: list[tuple[str, list[dict], list[dict]]]):
    """The figure of plot_runs, from read_metrics' (name, step records, kNN events) of each run."""
    plt = _pyplot()
    titles: dict[str, list[str]] = {}
    for _, steps, _ in runs:
        for title, keys in _panels(steps).items():
            titles.setdefault(title, [])
            titles[title] += [k for k in keys if k not in titles[title]]
    if any(knn for *_, knn in runs):
        titles["kNN top-1 (%)"] = []
    colours, styles = _line_styles(runs)
    cols = min(3, len(titles))
    rows = math.ceil(len(titles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    for ax, (title, keys) in zip(axes.flat, titles.items()):
        for (name, steps, knn), colour in zip(runs, colours):
            if title.startswith("kNN"):
                peers = sorted({p for e in knn for p in e["top1"]})
                for peer in peers:
                    pts = [(e["step"], e["top1"][peer]) for e in knn if peer in e["top1"]]
                    ax.plot(*zip(*pts), marker="o", color=colour, linestyle=styles[peer], label=f"{name} {peer}")
                continue
            for key in keys:
                pts = [(r["step"], r[key]) for r in steps if key in r]
                if pts:  # keys are "loss", "PEER/term" or "lr/PEER"
                    peer = "" if key == "loss" else key.split("/")[1 if key.startswith("lr/") else 0]
                    ax.plot(*zip(*pts), color=colour, linestyle=styles[peer], label=f"{name} {peer}".strip())
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(titles):]:
        ax.axis("off")
    fig.suptitle(" vs ".join(name for name, *_ in runs))
    return fig


def plot_runs(specs: list[str | Path], out: str | Path) -> Path:
    """Every run's curves overlaid, one panel per term (peers as separate lines), and kNN top-1 over steps: each run
    one colour in every panel, each peer one line style."""
    return _save(curves_figure([read_metrics(s) for s in specs]), Path(out))


# ---- benchmark charts --------------------------------------------------------------------------------------------

def _kind(result: dict, path: Path) -> str:
    kind = result.get("benchmark")
    if kind not in ("pipeline", "contrastive_loss", "train_step"):
        raise PlotError(f"{path}: not a dogo benchmark result (its 'benchmark' is {kind!r}; expected one written by "
                        f"dogo bench pipeline, loss or train)")
    return kind


def _pipeline_chart(ax, results: list[dict]) -> None:
    """Images/s per backend with the same run's torchvision and decode-only bars beside it."""
    labels, values, colours = [], [], []
    backends = [r["backend"] for r in results]
    for r in results:
        tag = f"{r['backend']}" + (f" ({r['placement']})" if "placement" in r else "")
        if backends.count(r["backend"]) > 1 and "placement" not in r:
            tag = r["_file"]  # two results of one backend: tell them apart by file
        for key, what, colour in (("backend_two_views", tag, "tab:blue"), ("torchvision", f"torchvision [{tag} run]",
                                                                           "tab:orange"),
                                  ("decode_only_ceiling", f"decode only [{tag} run]", "tab:gray")):
            if key in r:
                labels.append(what)
                values.append(r[key]["images_per_s"])
                colours.append(colour)
    bars = ax.barh(labels, values, color=colours)
    ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xscale("log")
    ax.invert_yaxis()
    first = results[0]
    ax.set_title(f"two views at {first['size']} px, batch {first['batch']}: images/s "
                 f"({first['environment'].get('cpu_count', '?')} cores, {first['device']})")


def _loss_charts(axes, results: list[dict]) -> None:
    """Time and peak memory against views, log axes, the kernel and the straightforward version."""
    for r in results:
        rows = r["results"]
        for ax, field, unit, scale in ((axes[0], "seconds_median", "s", 1), (axes[1], "peak_bytes", "GB", 1e-9)):
            for version, style in (("kernel", "-o"), ("straightforward", "--s")):
                pts = [(row["views"], row[version][field] * scale) for row in rows
                       if field in row.get(version, {})]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{version} ({r['objective']}, {r['embedding_dtype']})")
            if field == "peak_bytes":
                pts = [(row["views"], row["straightforward_lower_bound_bytes"] * scale) for row in rows
                       if row.get("straightforward", {}).get("would_not_fit")]
                if pts:
                    ax.plot(*zip(*pts), "x", color="tab:red", label="straightforward: would not fit (least needed)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("views (2N)")
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    axes[0].set_title("forward + backward time")
    axes[1].set_title("peak memory")


def _train_chart(ax, results: list[dict]) -> None:
    """Images/s per configuration: the step with its data and the engine alone, median with min-max."""
    labels, med, err = [], [], []
    for r in results:
        for key in ("step_with_batch_and_augmentation", "engine_only", "end_to_end", "synthetic_ceiling"):
            if key in r:
                m = r[key]
                labels.append(f"{r['config']} {r['image_size']}px bs{r['batch_per_device']}: {key}")
                med.append(m["images_per_s_median"])
                err.append((m["images_per_s_median"] - m["images_per_s_min"],
                            m["images_per_s_max"] - m["images_per_s_median"]))
    bars = ax.barh(labels, med, xerr=list(zip(*err)) if err else None, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.invert_yaxis()
    ax.set_title("training step: images/s per device (median, min-max)")


def plot_bench(paths: list[str | Path], out: str | Path) -> Path:
    """One chart per kind of benchmark among the result files, stacked in one picture."""
    plt = _pyplot()
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for p in map(Path, paths):
        try:
            result = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlotError(f"{p}: cannot read a JSON result ({exc})") from None
        by_kind[_kind(result, p)].append({**result, "_file": p.stem})
    rows = len(by_kind)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4 * rows), squeeze=False, layout="constrained")
    for row, (kind, results) in enumerate(by_kind.items()):
        if kind == "contrastive_loss":
            _loss_charts(axes[row], results)
            continue
        gs = axes[row, 0].get_gridspec()
        for ax in axes[row]:
            ax.remove()
        ax = fig.add_subplot(gs[row, :])
        (_pipeline_chart if kind == "pipeline" else _train_chart)(ax, results)
    return _save(fig, Path(out))


# ---- feature maps ------------------------------------------------------------------------------------------------

MAP_METHODS = ("tsne", "umap", "pca")


# the fewest points each map is defined for (PCA's two components, t-SNE's perplexity, UMAP's spectral start)
MIN_POINTS = {"pca": 2, "tsne": 2, "umap": 4}


def embed_2d(features, method: str, seed: int = 0):
    """(n, 2) coordinates of (n, D) features: PCA and t-SNE from scikit-learn, UMAP from umap-learn; the features
    are L2-normalised first (the geometry kNN sees)."""
    import numpy as np
    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method not in MAP_METHODS:
        raise PlotError(f"--method {method!r}: one of {', '.join(MAP_METHODS)}")
    if len(x) < MIN_POINTS[method]:
        raise PlotError(f"a {method} map needs the features of at least {MIN_POINTS[method]} images; the split gave "
                        f"{len(x)}: map a split with more readable images (--set data.path=... or "
                        f"--set data.val_split=...)")
    try:
        if method == "umap":
            import umap
            return umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(x) - 1)).fit_transform(x)
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError as exc:
        raise PlotError(f"dogo plot features --method {method} needs {exc.name}: install the viz extra "
                        f"(make setup, or pip install -e '.[viz]')") from None
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    # perplexity must stay below the number of points; 30 is t-SNE's usual value
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, (len(x) - 1) / 3)).fit_transform(x)


def plot_feature_map(coords, labels, classes: list[str], title: str, out: str | Path) -> Path:
    """A scatter of 2-D coordinates coloured by class, with the class names in the legend (up to 20 of them)."""
    import numpy as np
    plt = _pyplot()
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(8, 7), layout="constrained")
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for c in np.unique(labels):
        at = labels == c
        ax.scatter(coords[at, 0], coords[at, 1], s=6, color=cmap(int(c) % cmap.N), alpha=0.8,
                   label=classes[int(c)] if len(classes) <= 20 else None)
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return _save(fig, Path(out))


# ---- studies ------------------------------------------------------------------------------------------------------

def plot_knn_curves(folder: str | Path, out: str | Path) -> Path:
    """kNN top-1 against epochs for every arm and peer (the mean over seeds, the band their range), from the arm
    files; the architecture's random init (the baselines files, same seed) as its epoch-0 point, and raw pixels as a
    dashed line."""
    from dogo.benchmarks.study import read_arm_files, read_baselines
    plt = _pyplot()
    curves: dict[tuple[str, str], dict[float, list[float]]] = {}
    protocol = None
    inits = {(b["arch"], b["cifar_stem"], f["seed"]): b for f in read_baselines(folder) for b in f["random_init"]}
    for r in read_arm_files(folder):
        protocol = protocol or r.get("knn_curve_protocol")
        preset = (protocol or "dino").split(" ")[0]
        peers = r["resolved_config"]["peers"]
        for peer in r["peers"]:
            points = curves.setdefault((r["arm"], peer), {})
            init = inits.get((peers[peer]["arch"], peers[peer]["cifar_stem"], r["seed"]))
            if init is not None:
                points.setdefault(0.0, []).append(init[preset])
            for e in r["knn_curve"]:
                if peer in e["top1"]:
                    points.setdefault(float(e["epoch"]), []).append(e["top1"][peer])
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    raw = [f["raw_pixels"][(protocol or "dino").split(" ")[0]] for f in read_baselines(folder)]
    if raw:
        ax.axhline(statistics.mean(raw), color="gray", linestyle="--", linewidth=1, label="raw pixels")
    for (arm, peer), points in sorted(curves.items()):
        epochs = sorted(points)
        mean = [statistics.mean(points[e]) for e in epochs]
        line, = ax.plot(epochs, mean, marker="o", markersize=3, label=f"{arm} {peer}")
        if any(len(points[e]) > 1 for e in epochs):
            ax.fill_between(epochs, [min(points[e]) for e in epochs], [max(points[e]) for e in epochs],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title(f"kNN top-1 on the val split against epochs ({protocol or 'dino'})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, Path(out))
