"""Configs written by earlier versions: keys and values that have moved since, rewritten in the stored dict before it
is built (a checkpoint's config), or named in the error for a config file that still uses them."""
from __future__ import annotations

# Keys that moved into a method's or a backend's sub-section: the schema class, old key -> new dotted tail
MOVED = {
    "PeerConfig": {"pred_hidden": "simsiam.pred_hidden", "momentum": "mocov2.momentum",
                   "momentum_schedule": "mocov2.momentum_schedule", "queue_size": "mocov2.queue_size",
                   "moco_symmetric": "mocov2.symmetric"},
    "DataConfig": {"beton": "ffcv.beton", "order": "ffcv.order", "os_cache": "ffcv.os_cache",
                   "ffcv_image_field": "ffcv.image_field", "ffcv_label_field": "ffcv.label_field",
                   "dali_hw_decoder_load": "dali.hw_decoder_load", "dali_scan": "dali.scan",
                   "synthetic_images": "synthetic.images"},
}

# Values renamed: dotted key -> {old value: new value}. A config that still says the old one loads as the new one.
RENAMED_VALUES: dict[str, dict[str, str]] = {"data.backend": {"cifar": "held"}}  # held reads CIFAR and folders

KNN_DEFAULTS_BEFORE_PROTOCOLS = (20, 0.07)  # eval.knn_k and knn_temperature before eval.knn_protocol existed


def moved_key(section: str, key: str) -> str | None:
    """Where `key` of schema class `section` went, as a dotted tail (None: it never moved)."""
    return MOVED.get(section, {}).get(key)


def migrate_stored(raw: dict, knn_presets: dict[str, tuple[int, float]]) -> dict:
    """A stored config (a checkpoint's) in today's layout, in place: moved keys into their sections, renamed values,
    and a kNN protocol named from the k and temperature it was written with."""
    _move_keys(raw.get("data") or {}, MOVED["DataConfig"])
    for peer in (raw.get("peers") or {}).values():
        if isinstance(peer, dict):
            _move_keys(peer, MOVED["PeerConfig"])
    rename_values(raw)
    _name_knn_protocol(raw.get("eval") or {}, knn_presets)
    return raw


def rename_values(raw: dict) -> None:
    """Renamed values of a raw config dict, in place."""
    for dotted, renames in RENAMED_VALUES.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf] in renames:
            node[leaf] = renames[node[leaf]]


def _move_keys(node: dict, moved: dict[str, str]) -> None:
    for old, new in moved.items():
        if old in node:
            section, key = new.split(".")
            node.setdefault(section, {})[key] = node.pop(old)


def _name_knn_protocol(ev: dict, presets: dict[str, tuple[int, float]]) -> None:
    """A config written before eval.knn_protocol: the preset its k and temperature match, else custom."""
    if not isinstance(ev, dict) or "knn_protocol" in ev or ("knn_k" not in ev and "knn_temperature" not in ev):
        return
    k, t = KNN_DEFAULTS_BEFORE_PROTOCOLS
    given = (ev.get("knn_k", k), ev.get("knn_temperature", t))
    ev["knn_protocol"] = next((n for n, preset in presets.items() if preset == given), "custom")
    ev["knn_k"], ev["knn_temperature"] = given
