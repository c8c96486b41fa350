"""What a result was measured on (versions, the device, the cores; written beside every benchmark and evaluation),
and the memory this machine and this process have (read from the device or /proc)."""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    env = {"code": code_version(), "torch": torch.__version__, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "torch_threads": torch.get_num_threads(),
           "device": str(device), "machine": platform.machine()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The dogo code a result came from: its git commit (with -dirty for uncommitted changes) when dogo runs from a
    checkout, else the installed version."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version
    here = Path(__file__).resolve().parent
    try:
        found = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=7"],
                               capture_output=True, text=True, timeout=5)
        if found.returncode == 0 and found.stdout.strip():
            return found.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return f"dogo {version('dogo')}"
    except PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the architecture where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
