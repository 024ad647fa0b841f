"""Model registry: every norm in every model, parameter budgets, norm channels and group checks."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from normcli.config import RunSpec
from normcli.data import get_dataset
from normcli.errors import NormcliError
from normcli.models import (
    build_model,
    count_params,
    default_model,
    get_model_info,
    list_models,
    norm_channels,
    resolve_groups,
    valid_groups,
)
from normcli.norms import WSConv2d

NORMS = ["bn", "gn", "ln", "in", "none"]
MODELS = list_models()
BUDGET = {(1, 28, 28): 10_000, (3, 32, 32): 50_000}  # parameters by input, for every norm


def default_dataset(shape: tuple[int, int, int]) -> str:
    """The study's dataset of images of `shape`: mnist or cifar10."""
    return {(1, 28, 28): "mnist", (3, 32, 32): "cifar10"}[shape]


def _input(name: str, n: int = 3, seed: int = 0) -> torch.Tensor:
    shape = get_model_info(name).input_shape
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _measured_norm_channels(name: str) -> dict[str, int]:
    """Channels reaching each norm position, measured by running the model without norms."""
    model = build_model(name, norm="none").eval()
    seen: dict[str, int] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Identity):
            module.register_forward_hook(
                lambda m, inputs, out, path=path: seen.__setitem__(path, inputs[0].shape[1])
            )
    model(_input(name, n=1))
    return seen


def _common_divisors(channels: list[int]) -> list[int]:
    g = math.gcd(*channels)
    return [d for d in range(1, g + 1) if g % d == 0]


def test_registry_has_models_for_both_datasets() -> None:
    assert sorted(MODELS) == MODELS
    for dataset in ("mnist", "cifar10"):
        names = list_models(dataset)
        assert names, dataset
        assert default_model(dataset) in names
        assert all(get_model_info(n).accepts(dataset) for n in names)
    assert sorted(list_models("mnist") + list_models("cifar10")) == MODELS


def test_unknown_model_lists_the_valid_names() -> None:
    with pytest.raises(NormcliError) as err:
        build_model("resnet50")
    for name in MODELS:
        assert name in str(err.value)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", MODELS)
def test_every_norm_in_every_model_runs_and_fits_the_budget(name: str, norm: str) -> None:
    shape = get_model_info(name).input_shape
    dataset = default_dataset(shape)
    model = build_model(name, norm=norm)
    x = _input(name, n=4)

    for mode in (model.train, model.eval):
        mode()
        logits = model(x)
        assert logits.shape == (4, get_dataset(dataset).num_classes) == (4, 10)
        assert torch.isfinite(logits).all()

    params = sum(p.numel() for p in model.parameters())
    assert params == count_params(model)
    assert params < BUDGET[shape], f"{name} with {norm}: {params} parameters"


@pytest.mark.parametrize("name", MODELS)
def test_norm_layers_are_the_right_kind_at_every_norm_position(name: str) -> None:
    channels = _measured_norm_channels(name)
    assert channels, "no norm positions found"

    def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
        return {
            p: m for p, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))
        }

    bn = norm_modules(build_model(name, norm="bn"))
    assert {p: m.num_features for p, m in bn.items()} == channels
    assert all(type(m) is nn.BatchNorm2d for m in bn.values())

    expected_groups = {
        "gn": lambda c: get_model_info(name).default_groups,
        "ln": lambda c: 1,  # LayerNorm = GroupNorm(1, C)
        "in": lambda c: c,  # InstanceNorm = GroupNorm(C, C)
    }
    for norm, groups in expected_groups.items():
        layers = norm_modules(build_model(name, norm=norm))
        assert set(layers) == set(channels), norm
        for path, layer in layers.items():
            assert type(layer) is nn.GroupNorm
            assert layer.num_channels == channels[path]
            assert layer.num_groups == groups(channels[path]), (norm, path)
            assert layer.affine

    assert norm_modules(build_model(name, norm="none")) == {}
    # Each norm layer has a per-channel weight and bias; "none" has neither.
    with_norm = count_params(build_model(name, norm="bn"))
    assert count_params(build_model(name, norm="none")) == with_norm - 2 * sum(channels.values())


@pytest.mark.parametrize("name", MODELS)
def test_norm_channels_matches_the_channels_measured_in_a_forward_pass(name: str) -> None:
    assert norm_channels(name) == _measured_norm_channels(name)


@pytest.mark.parametrize("name", MODELS)
def test_valid_groups_are_exactly_the_common_divisors(name: str) -> None:
    channels = list(_measured_norm_channels(name).values())
    assert valid_groups(name) == _common_divisors(channels)


@pytest.mark.parametrize("name", MODELS)
def test_every_group_count_is_accepted_or_refused_naming_the_layer(name: str) -> None:
    channels = _measured_norm_channels(name)
    budget = BUDGET[get_model_info(name).input_shape]
    for groups in range(1, max(channels.values()) + 2):
        if all(c % groups == 0 for c in channels.values()):
            model = build_model(name, norm="gn", groups=groups)
            gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
            assert len(gns) == len(channels)
            assert all(m.num_groups == groups for m in gns)
            assert model(_input(name)).shape == (3, 10)
            assert count_params(model) < budget
            continue
        with pytest.raises(NormcliError) as err:
            build_model(name, norm="gn", groups=groups)
        message = str(err.value)
        named = [
            (layer, c)
            for layer, c in channels.items()
            if c % groups and layer in message and re.search(rf"\b{c}\b", message)
        ]
        assert named, f"--groups {groups}: {message!r} names no offending layer and its channels"


def test_default_groups_are_the_models_and_resolve_into_the_config() -> None:
    assert get_model_info("mnist_net").default_groups == 4
    assert get_model_info("cifar_net").default_groups == 2
    for dataset, name, groups in (("mnist", "mnist_net", 4), ("cifar10", "cifar_net", 2)):
        gns = [m for m in build_model(name, norm="gn").modules() if isinstance(m, nn.GroupNorm)]
        assert gns and {m.num_groups for m in gns} == {groups}
        assert RunSpec.from_options(dataset=dataset, norm="gn").resolve().model.groups == groups
        one = RunSpec.from_options(dataset=dataset, norm="gn", groups=1).resolve()
        assert one.model.groups == 1
        assert RunSpec.from_options(dataset=dataset, norm="ln").resolve().model.groups is None
    assert resolve_groups("cifar_net", "bn", None) is None
    with pytest.raises(NormcliError, match="groups apply to gn only"):
        resolve_groups("cifar_net", "bn", 2)


def test_groups_error_example() -> None:
    with pytest.raises(NormcliError) as err:
        build_model("mnist_net", norm="gn", groups=3)
    assert "'features.0.norm'" in str(err.value)
    assert "8 channels" in str(err.value)
    assert "1, 2, 4" in str(err.value)  # the valid counts


def test_cli_refuses_groups_that_do_not_divide_a_layer(cli, tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    result = cli(
        "train", "--dataset", "cifar10", "--norm", "gn", "--groups", "16",
        "--data-dir", tmp_path, "--device", "cpu", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "'features.7.norm'" in result.stderr and "44 channels" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("norm", ["gn", "ln", "in", "none"])
def test_batch_free_norms_make_each_output_independent_of_the_batch(norm: str) -> None:
    model = build_model("mnist_net", norm=norm).train()
    x = _input("mnist_net", n=6, seed=1)
    torch.testing.assert_close(model(x[:2]), model(x)[:2])


def test_batchnorm_in_training_mode_depends_on_the_batch() -> None:
    model = build_model("mnist_net", norm="bn").train()
    x = _input("mnist_net", n=6, seed=1)
    assert not torch.allclose(model(x[:2]), model(x)[:2])


def test_dropout_option() -> None:
    model = build_model("cifar_net", dropout=0.3)
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert rates and all(p == 0.3 for p in rates)
    assert not any(isinstance(m, nn.Dropout) for m in build_model("cifar_net").modules())
    with pytest.raises(NormcliError, match="dropout"):
        build_model("cifar_net", dropout=1.0)


def test_num_classes_option() -> None:
    model = build_model("mnist_net", num_classes=3)
    assert model(_input("mnist_net")).shape == (3, 3)


@pytest.mark.parametrize("name", MODELS)
def test_weight_standardization_swaps_every_conv_and_adds_no_parameters(name: str) -> None:
    def convs(model: nn.Module) -> set[type]:
        return {type(m) for m in model.modules() if isinstance(m, nn.Conv2d)}

    assert convs(build_model(name, norm="bn")) == {nn.Conv2d}
    assert convs(build_model(name, norm="gn")) == {WSConv2d}  # the default for gn, ln, in
    assert convs(build_model(name, norm="ln", ws=False)) == {nn.Conv2d}
    assert convs(build_model(name, norm="bn", ws=True)) == {WSConv2d}
    assert count_params(build_model(name, norm="gn", ws=True)) == count_params(
        build_model(name, norm="gn", ws=False)
    )
