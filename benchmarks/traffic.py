"""Bytes an eager computation moves through memory, counted op by op with a dispatch mode: what a GPU would read
and write if every op were its own kernel over device memory (no cache), which is how unfused eager code runs.

Per aten op: the bytes of every tensor it reads plus every tensor it writes. A view (slice, permute, expand) moves
nothing; an expanded operand counts its own elements once, not its broadcast size; allocation moves nothing;
index_select reads only the rows it selects and index_copy_ writes only the rows it copies; an out= tensor is
written, not read.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_ALLOCATIONS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::zeros_like"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a (possibly strided or expanded) tensor addresses."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


class ByteCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.total = 0
        self.by_op: dict[str, int] = {}

    def _add(self, name: str, n: int) -> None:
        self.total += n
        self.by_op[name] = self.by_op.get(name, 0) + n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if func.is_view or name in _ALLOCATIONS:
            return out
        if name == "aten::index_select":
            self._add(name, 2 * tensor_bytes(out) + tensor_bytes(args[2]))
        elif name == "aten::index_copy_":
            self._add(name, 2 * tensor_bytes(args[3]) + tensor_bytes(args[2]))
        else:
            read = [a for a in tree_flatten((args, {k: v for k, v in kwargs.items() if k != "out"}))[0]
                    if isinstance(a, torch.Tensor)]
            written = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            self._add(name, sum(map(tensor_bytes, read)) + sum(map(tensor_bytes, written)))
        return out


def recipe_traffic(recipe, size: int, batch: int, work: torch.dtype, out_dtype: torch.dtype, seed: int = 0
                   ) -> dict:
    """Bytes per image per view of the device recipe (augment.DeviceRecipe.apply) on a batch of uint8 crops in the
    recipe's sorted order, as the backends hand them over, with the work dtype of a GPU (float16) or of a CPU; run
    on the CPU, where the same ops dispatch."""
    from dogo.pipelines.recipe import device as augment, params as P
    device = torch.device("cpu")
    dev_recipe = augment.DeviceRecipe(recipe, size, device, out_dtype, channels_last=True, work=work)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    plan = augment.plan(P.draw(recipe, P.stream_keys(seed, 0, np.arange(batch), 0)))
    dev_recipe.apply(images, plan)  # cached constants made outside the count
    with ByteCounter() as counter:
        dev_recipe.apply(images, plan)
    return {"bytes_per_image_per_view": counter.total / batch, "size": size, "batch": batch, "work_dtype": str(work),
            "by_op": {k: v / batch for k, v in sorted(counter.by_op.items(), key=lambda kv: -kv[1])}}
