"""Which dtype and memory format the step runs in: one rule for the trainer, the benchmarks and evaluation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dogo.engine.config import ConfigError


@dataclass
class Precision:
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    channels_last: bool

    @property
    def scaler_enabled(self) -> bool:
        return self.dtype == torch.float16


def resolve_precision(dtype: str, channels_last: str, device: torch.device) -> Precision:
    """precision.dtype and precision.channels_last for `device`. auto: bf16 autocast and channels_last on CUDA;
    fp32 on CPUs (bf16 is about 2x slower on CPUs without AMX, measured on ours)."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "fp16" and device.type != "cuda":
        raise ConfigError("precision.dtype=fp16 needs CUDA; use fp32 or bf16 on CPUs")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return Precision(torch_dtype, device.type == "cuda" if channels_last == "auto" else channels_last == "on")


def of_config(cfg, device: torch.device) -> Precision:
    return resolve_precision(cfg.precision.dtype, cfg.precision.channels_last, device)
