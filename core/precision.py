"""Which dtype and memory format the step runs in, and the backend flags that go with them: one object for the
trainer, evaluation and the benchmarks, built from the resolved config (engine/config/resolve.py settles `auto`)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of images and conv weights: channels_last where the config says so (CUDA's tensor cores)."""
    return torch.channels_last if channels_last else torch.contiguous_format


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    channels_last: bool

    @classmethod
    def of(cls, cfg) -> "Precision":
        """From a resolved config's precision section."""
        p = cfg.precision
        if p.dtype not in DTYPES or p.channels_last not in ("on", "off"):
            raise ValueError(f"precision is not resolved (dtype={p.dtype}, channels_last={p.channels_last}): "
                             f"load the config with dogo.engine.config.load or resolve() it first")
        return cls(DTYPES[p.dtype], p.channels_last == "on")

    @property
    def memory_format(self) -> torch.memory_format:
        return memory_format(self.channels_last)

    @property
    def scaler_enabled(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self, device: torch.device):
        """The forward's autocast context (none in fp32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def set_backend_flags(self, device: torch.device) -> None:
        """On CUDA: cuDNN autotunes each conv once (the step's shapes are fixed), TF32 for the fp32 loss matmuls."""
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
