"""What a training-step result's host launches per step read as, in one line: `dogo bench train`'s summary and `make
gpu-check`'s table both print it (this module imports no torch, so the check's summary starts at once)."""
from __future__ import annotations


def launch_text(launches: dict) -> str:
    """'N launches per step' and what they are: aten ops, and CUDA graph replays of how many ops each."""
    text = f"{launches['host_launches']} launches per step"
    if launches.get("ops_per_replay") is not None:
        return (text + f" ({launches['aten_ops']} aten ops + {launches['graph_replays']} CUDA graph replay of "
                f"{launches['ops_per_replay']} ops)")
    return text + " (aten ops)"
