"""The online linear probe (eval.online_probe): per peer, a linear classifier on the backbone's detached features of
the training views, trained beside SSL with an optimiser of its own, as solo-learn's and lightly's online
classifiers; its train accuracy goes into the log lines, its val accuracy is measured at epoch ends.

The features are taken by a forward hook on each peer's backbone while the trainer's step runs, so the peers' forward
is unchanged; they are detached, the classifiers are initialised from a generator of their own, and nothing of the
probe touches the peers' parameters, gradients or the global RNG: the peers train bit-identically with it on or off.
Under torchrun each rank's classifier gradients are all-reduced (one collective per step, no host sync).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dogo.engine.dist.distributed import all_reduce_mean
from dogo.engine.eval.evaluate import topk_accuracy
from dogo.engine.eval.linear import classifier


class OnlineProbe:
    def __init__(self, peers: dict[str, nn.Module], num_classes: int, lr: float, seed: int,
                 device: torch.device, distributed: bool):
        self.classifiers = nn.ModuleDict({name: classifier(peer.num_features, num_classes, seed + i)
                                          for i, (name, peer) in enumerate(peers.items())}).to(device)
        self.optimizer = torch.optim.SGD(self.classifiers.parameters(), lr=lr, momentum=0.9)
        self.distributed = distributed
        self._features: dict[str, torch.Tensor] = {}
        self.capturing = False
        self._hooks = [peer.backbone.register_forward_hook(self._hook(name)) for name, peer in peers.items()]

    def _hook(self, name: str):
        def keep(module, inputs, output):
            # only the trainer's step (not evaluation's or a momentum copy's forwards), and of its groups of views
            # the first, the large crops (solo-learn's online classifier sees those only)
            if self.capturing:
                self._features.setdefault(name, output.detach())
        return keep

    def step(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One update of every classifier on the features the last forward captured (both views of each image,
        rows labelled -1 left out); returns each peer's loss and train top-1 (%) as device scalars."""
        terms, loss = {}, 0
        for name, clf in self.classifiers.items():
            f = self._features.pop(name)
            y = labels.repeat(f.shape[0] // labels.shape[0])  # the peer's views were concatenated
            labelled = (y >= 0).sum().clamp_min(1)
            logits = clf(f.float())
            peer_loss = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum") / labelled
            loss = loss + peer_loss
            terms[f"probe/{name}/loss"] = peer_loss.detach()
            terms[f"probe/{name}/top1"] = 100 * (logits.argmax(1) == y).sum() / labelled
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.distributed:
            grads = [p.grad for p in self.classifiers.parameters()]
            flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))  # one collective for all of them
            for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(mean.view_as(g))
        self.optimizer.step()
        return terms

    @torch.no_grad()
    def top1(self, name: str, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 (%) of peer `name`'s classifier on (val) features."""
        return topk_accuracy(self.classifiers[name](features), labels, ks=(1,))["top1"]

    def state_dict(self) -> dict:
        return {"classifiers": self.classifiers.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> str | None:
        """The classifiers and their optimiser from a checkpoint; or, where the checkpoint's classifiers have other
        shapes (the dataset's class count changed since), nothing: the probe starts afresh, as one turned on at a
        resume does, and the reason is returned for the log."""
        own, saved = self.classifiers.state_dict(), state["classifiers"]
        shape = lambda d, k: tuple(d[k].shape) if k in d else "none"  # noqa: E731
        differ = [k for k in {**own, **saved} if shape(own, k) != shape(saved, k)]
        if differ:
            k = differ[0]
            return (f"the online probe's classifiers in the checkpoint do not fit this run ({k}: {shape(saved, k)} "
                    f"there, {shape(own, k)} now: the number of classes changed?); the probe starts afresh")
        self.classifiers.load_state_dict(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        return None
