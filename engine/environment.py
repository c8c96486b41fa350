"""What a result was measured on: versions, the device, the cores; written beside every benchmark and evaluation."""
from __future__ import annotations

import os
import platform

import torch


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(device), "machine": platform.machine()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env


def device_tag(env: dict) -> str:
    """The result-file suffix naming the machine: the GPU's name, or cpu<cores>."""
    return (env["gpu"] or f"cpu{env['cpu_count']}").replace(" ", "_")
