"""Norm layers by name: what each name builds, what it computes, and the (norm, groups) checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from normcli.errors import NormcliError
from normcli.norms import (
    DEFAULT_GROUPS,
    NORMS,
    WSConv2d,
    check_norm,
    conv_layer,
    get_norm_layer,
    norm_label,
    resolve_ws,
    standardize,
)

ALL_NORMS = ["bn", "gn", "ln", "in", "none"]


def test_the_table_holds_exactly_the_five_norms() -> None:
    assert sorted(NORMS) == sorted(ALL_NORMS)


@pytest.mark.parametrize("channels", [8, 12, 16])
def test_each_name_builds_its_layer(channels: int) -> None:
    bn = get_norm_layer("bn")(channels)
    assert type(bn) is nn.BatchNorm2d and bn.num_features == channels

    gn = get_norm_layer("gn")(channels)
    assert type(gn) is nn.GroupNorm
    assert (gn.num_groups, gn.num_channels) == (DEFAULT_GROUPS, channels) == (4, channels)

    gn2 = get_norm_layer("gn", 2)(channels)
    assert (gn2.num_groups, gn2.num_channels) == (2, channels)

    ln = get_norm_layer("ln")(channels)
    assert type(ln) is nn.GroupNorm and (ln.num_groups, ln.num_channels) == (1, channels)

    inorm = get_norm_layer("in")(channels)
    assert type(inorm) is nn.GroupNorm
    assert (inorm.num_groups, inorm.num_channels) == (channels, channels)

    assert type(get_norm_layer("none")(channels)) is nn.Identity


def _batch(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 8, 5, 5, generator=g) * 3 + 1


def _standardize(x: torch.Tensor, dims: tuple[int, ...], eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def test_ln_normalizes_each_sample_over_channels_and_space() -> None:
    x = _batch()
    torch.testing.assert_close(get_norm_layer("ln")(8)(x), _standardize(x, (1, 2, 3)))


def test_in_normalizes_each_sample_and_channel_over_space() -> None:
    x = _batch(1)
    torch.testing.assert_close(get_norm_layer("in")(8)(x), _standardize(x, (2, 3)))


def test_gn_normalizes_each_group_of_channels() -> None:
    x = _batch(2)
    by_group = x.reshape(4, 2, 4, 5, 5)  # 8 channels in 2 groups of 4
    expected = _standardize(by_group, (2, 3, 4)).reshape(x.shape)
    torch.testing.assert_close(get_norm_layer("gn", 2)(8)(x), expected)


def test_bn_in_training_normalizes_each_channel_over_the_batch() -> None:
    x = _batch(3)
    torch.testing.assert_close(get_norm_layer("bn")(8).train()(x), _standardize(x, (0, 2, 3)))


def test_none_passes_through() -> None:
    x = _batch(4)
    assert torch.equal(get_norm_layer("none")(8)(x), x)


def test_unknown_norm_lists_the_valid_names() -> None:
    with pytest.raises(NormcliError) as err:
        check_norm("batchnorm", None)
    for name in ALL_NORMS:
        assert name in str(err.value)


@pytest.mark.parametrize("norm", ["bn", "ln", "in", "none"])
def test_groups_with_a_norm_other_than_gn_is_refused(norm: str) -> None:
    with pytest.raises(NormcliError, match="gn"):
        check_norm(norm, 2)
    with pytest.raises(NormcliError, match="gn"):
        get_norm_layer(norm, 1)
    assert check_norm(norm, None) is None


@pytest.mark.parametrize("groups", [0, -2])
def test_groups_must_be_positive(groups: int) -> None:
    with pytest.raises(NormcliError, match="positive"):
        check_norm("gn", groups)


def test_gn_without_groups_uses_the_default() -> None:
    assert check_norm("gn", None) == DEFAULT_GROUPS
    assert check_norm("gn", 8) == 8


def test_labels() -> None:
    assert norm_label("ln") == "LN"
    assert norm_label("gn", 2) == "GN (G=2)"
    assert norm_label("bn", None, 1e-4).startswith("BN + L1 (")
    assert norm_label("bn") == "BN"


@pytest.mark.parametrize("norm", ["bn", "ln", "in", "none"])
def test_cli_refuses_groups_with_a_norm_other_than_gn(cli, tmp_path: Path, norm: str) -> None:
    out = tmp_path / "x.safetensors"
    result = cli(
        "train", "--norm", norm, "--groups", "2", "--data-dir", tmp_path, "--device", "cpu",
        "--out", out,
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--groups" in lines[0] and "gn" in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_standardize_gives_each_filter_zero_mean_and_unit_variance() -> None:
    weight = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.1
    out = standardize(weight)
    flat = weight.reshape(6, -1).double()
    expected = (flat - flat.mean(1, keepdim=True)) / (
        flat.var(1, unbiased=False, keepdim=True) + 1e-5
    ).sqrt()
    torch.testing.assert_close(out.reshape(6, -1).double(), expected, rtol=1e-5, atol=1e-6)


def test_ws_conv_applies_the_standardized_weight_and_ignores_filter_scale_and_shift() -> None:
    torch.manual_seed(0)
    conv = WSConv2d(3, 5, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8)
    flat = conv.weight.detach().reshape(5, -1)
    mean, std = flat.mean(1), (flat.var(1, unbiased=False) + 1e-5).sqrt()
    standardized = (conv.weight.detach() - mean.view(5, 1, 1, 1)) / std.view(5, 1, 1, 1)
    expected = torch.nn.functional.conv2d(x, standardized, padding=1)
    torch.testing.assert_close(conv(x), expected)
    with torch.no_grad():  # per-filter affine changes of the raw weight change nothing but eps
        conv.weight.mul_(torch.tensor([1.5, 2, 3, 7, 10.0]).view(5, 1, 1, 1)).add_(0.3)
    torch.testing.assert_close(conv(x), expected, rtol=2e-3, atol=2e-3)


def test_weight_standardization_defaults_per_norm() -> None:
    assert {n: resolve_ws(n, None) for n in ALL_NORMS} == {
        "bn": False, "gn": True, "ln": True, "in": True, "none": False,
    }  # fmt: skip
    assert all(resolve_ws(n, True) and not resolve_ws(n, False) for n in ALL_NORMS)
    assert conv_layer(True) is WSConv2d and conv_layer(False) is nn.Conv2d
    assert norm_label("gn", 4, ws=True) == "GN (G=4) + WS"
    assert norm_label("bn", l1=1e-4, ws=True) == "BN + WS + L1 (1e-4)"


def test_training_layout_defaults_per_norm() -> None:
    """Without a timed trial (normcli.tuning), GroupNorm trains contiguous (its channels_last
    kernels were the slower ones on an AMD EPYC); the others channels_last; an explicit
    choice wins. Resolving leaves the choice to the run's start."""
    from normcli.config import RunSpec
    from normcli.tuning import choose

    def layout(**options: object) -> bool | None:
        spec = RunSpec.from_options(dataset="mnist", **options).resolve()
        return choose(spec, torch.device("cpu"), measure=False).channels_last

    assert RunSpec.from_options(norm="gn").resolve().train.channels_last is None

    assert {n: layout(norm=n) for n in ("bn", "gn", "ln")} == {"bn": True, "gn": False, "ln": True}
    assert layout(norm="gn", channels_last=True) is True
    assert layout(norm="bn", channels_last=False) is False
    default = RunSpec.from_options(norm="gn").resolve().default_path()
    assert default.name == "mnist_mnist_net_gn-g4_s1.safetensors"  # the default is no recipe
