"""What a result was measured on (versions, the device, the cores; written beside every benchmark and evaluation),
and the memory this machine and this process have (read from the device or /proc)."""
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


def available_bytes(device: torch.device) -> int:
    """What the device can still give this rank: its GPU's free memory, or on a CPU the kernel's MemAvailable
    shared by the ranks on this node."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _host_available() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def process_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now; VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
