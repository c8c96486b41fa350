"""CUDA graphs for the training step (precision.cuda_graphs=on): the step's body is captured once into a CUDA graph
and then replayed, one launch in place of the hundreds an eager step makes. At 32 px the host's launches, not the
GPU, set the eager step's pace (docs/gpu.md); a replay leaves the host free to prepare the next batch meanwhile.

Whole-network capture as torch's CUDA notes describe it (torch.cuda.CUDAGraph, not torch.compile's reduce-overhead
mode: the step's backward, fused optimiser, GradScaler and method states are captured as they run eagerly, with no
compilation to wait for). What a captured body must hold, and what the trainer's body does:
- static inputs: each step's views and labels are copied into buffers the graph reads;
- static shapes and no host synchronisation (the CPU tests run the body under tests/helpers.py's guards);
- the same kernels with the same arguments at every step: what changes from step to step is decided on the host
  before the step and written into device tensors the body reads (the lr: engine/run/optim.py set_lr; a momentum:
  MethodState.schedule), and state carried between steps is updated in place (optimiser state, the divergence
  flag, the queue's position, BatchNorm statistics);
- outputs: the body's loss terms are tensors of the graph's own memory, overwritten by the next replay; each step
  hands out a copy (one launch).

On a CPU nothing is captured: the same body runs on the same static buffers, which is how the tests compare it
with the eager step bit for bit. Under DDP the trainer refuses graphs (a ConfigError): DDP's reducer would have to
be captured too, which needs its own warm-up and static-graph mode and is not tested here.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

Body = Callable[[list[torch.Tensor], torch.Tensor], dict[str, torch.Tensor]]

# eager steps before the capture: optimiser state, GradScaler's scale and cuDNN's autotuning are made by then
# (torch's CUDA notes warm up 3 iterations on a side stream)
WARMUP_STEPS = 3


class StepGraph:
    """Calls `body(views, labels)` (the trainer's step after its host-side settings) through static buffers: eagerly
    for the first `warmup_steps` calls, then, on CUDA, once under capture and afterwards by replaying the graph.

    A batch whose shapes differ from the first one's (a smaller last batch of a backend that keeps it) runs the body
    eagerly on its own tensors: the same computation, without the graph."""

    def __init__(self, body: Body, device: torch.device, warmup_steps: int = WARMUP_STEPS):
        if warmup_steps < 1:
            raise ValueError("CUDA graphs need at least one eager step before the capture (the optimiser's state)")
        self.body, self.device, self.warmup_steps = body, device, warmup_steps
        self.views: list[torch.Tensor] | None = None  # the static inputs the graph reads
        self.labels: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: dict[str, torch.Tensor] | None = None  # the graph's loss terms, overwritten by each replay
        self.eager_steps = 0
        self.replays = 0
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None  # the warm-up steps' stream

    @property
    def captures(self) -> bool:
        return self.device.type == "cuda"

    def __call__(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.views is None:
            self.views = [torch.empty_like(v) for v in views]
            self.labels = torch.empty_like(labels)
        if not self._fits(views, labels):
            return self.body(views, labels)
        for static, v in zip(self.views, views):
            static.copy_(v)
        self.labels.copy_(labels)
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
            return self._handed_out(self.outputs)
        if self.captures and self.eager_steps >= self.warmup_steps:
            self._capture()
            self.graph.replay()  # the capture recorded this step's work without running it
            self.replays += 1
            return self._handed_out(self.outputs)
        self.eager_steps += 1
        return self._handed_out(self._eager())

    def _fits(self, views: list[torch.Tensor], labels: torch.Tensor) -> bool:
        same = lambda a, b: a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()  # noqa: E731
        return (len(views) == len(self.views) and all(same(a, b) for a, b in zip(views, self.views))
                and same(labels, self.labels))

    def _eager(self) -> dict[str, torch.Tensor]:
        """The body on the static buffers; on CUDA on a side stream, as torch's notes warm up before a capture."""
        if not self.captures:
            return self.body(self.views, self.labels)
        main, side = torch.cuda.current_stream(self.device), self.side
        side.wait_stream(main)
        with torch.cuda.stream(side), warnings.catch_warnings():
            # a capturable optimiser (AdamW's) warns when it runs uncaptured: here it does so by design
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            out = self.body(self.views, self.labels)
        main.wait_stream(side)
        return out

    def _capture(self) -> None:
        """thread_local: only this thread's CUDA calls are held to what a capture allows; a loader's threads (a
        DataLoader pinning its next batch) go on meanwhile."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.outputs = self.body(self.views, self.labels)
        self.graph = graph  # only a capture that finished is ever replayed

    @staticmethod
    def _handed_out(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The terms in one new tensor (one launch): the next replay overwrites the graph's own."""
        values = torch.stack([v.float() for v in terms.values()])
        return dict(zip(terms, values.unbind()))
