"""Inference helpers: BatchNorm folding gives the same predictions with fewer layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normcli.evaluate import fold_batchnorm
from normcli.models import build_model


def _trained_bn_model(name: str, shape: tuple[int, ...]) -> nn.Module:
    """Running statistics and affine parameters far from their initial values, in eval mode."""
    torch.manual_seed(3)
    model = build_model(name, norm="bn")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(3):
            model(torch.randn(16, *shape) * 1.5 + 0.3)
    return model.eval()


@pytest.mark.parametrize(
    ("name", "shape"), [("mnist_net", (1, 28, 28)), ("cifar_net", (3, 32, 32))]
)
def test_folded_model_matches_the_original_and_leaves_it_untouched(
    name: str, shape: tuple[int, ...]
) -> None:
    model = _trained_bn_model(name, shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)

    assert folded is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == sum(
        isinstance(m, nn.Conv2d) for m in model.modules()
    )
    x = torch.randn(8, *shape)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_nothing_to_fold_returns_the_model_itself() -> None:
    for norm in ("gn", "ln", "none"):
        model = build_model("mnist_net", norm=norm).eval()
        assert fold_batchnorm(model) is model
    bn_with_ws = build_model("mnist_net", norm="bn", ws=True).eval()  # WS convs are not folded
    assert fold_batchnorm(bn_with_ws) is bn_with_ws
    training = build_model("mnist_net", norm="bn").train()  # batch statistics: nothing fixed
    assert fold_batchnorm(training) is training
