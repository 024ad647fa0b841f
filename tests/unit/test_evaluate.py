"""Inference helpers: BatchNorm folding and the memory layout change speed, not predictions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normcli.data import Split, get_dataset
from normcli.evaluate import _memory_format, fold_batchnorm, predict
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


@pytest.mark.parametrize("norm", ["bn", "gn"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_predict_runs_in_the_models_layout_and_matches_a_plain_forward(
    norm: str, layout: torch.memory_format
) -> None:
    torch.manual_seed(5)
    model = build_model("mnist_net", norm=norm).to(memory_format=layout).eval()
    # The first conv has one input channel, so its weight is both layouts at once: the
    # layout must be read from the others (it once was not, and MNIST ran mixed, slowly).
    assert _memory_format(model) == layout
    strides = [p.stride() for p in model.parameters()]
    split = Split(torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), torch.zeros(40))
    spec = get_dataset("mnist")

    logits = predict(model, split, spec, batch_size=16)

    x = (split.images.float() / 255 - spec.mean[0]) / spec.std[0]
    with torch.no_grad():
        expected = model(x.contiguous())
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert [p.stride() for p in model.parameters()] == strides
