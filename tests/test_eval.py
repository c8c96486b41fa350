"""The linear probe on features whose classes are linearly separable."""
import torch

from dogo.engine.eval.evaluate import linear_probe, topk_accuracy


def test_linear_probe_separates_separable_features():
    """12 classes, so that top-5 is not all of them: separable features are learnt, and features carrying no class
    information stay near chance."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 16, generator=g) * 4

    def sample(n, informative=True):
        y = torch.randint(0, 12, (n,), generator=g)
        return (centres[y] if informative else 0) + torch.randn(n, 16, generator=g), y
    result = linear_probe(*sample(1200), *sample(400), num_classes=12, epochs=20, lr=1e-2)
    assert result["top1"] > 95 and result["top5"] > 99
    chance = linear_probe(*sample(1200, False), *sample(400, False), num_classes=12, epochs=20, lr=1e-2)
    assert chance["top1"] < 20 and chance["top5"] < 60


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(scores, torch.tensor([1, 2, 0]), ks=(1, 2))
    assert abs(acc["top1"] - 100 / 3) < 1e-4 and abs(acc["top2"] - 200 / 3) < 1e-4
