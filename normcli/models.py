"""Model registry and the networks.

A model is a plain builder function decorated with `@register`; `build_model` is
the one door, `list_models` answers "what is there?". Builders take a
`norm_layer` and a `conv_layer` (see `normcli.norms`) so every norm, with or without
weight standardization, fits every model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from normcli.data import DATASETS, get_dataset
from normcli.errors import NormcliError
from normcli.norms import (
    DEFAULT_GROUPS,
    NormLayer,
    check_norm,
    conv_layer,
    get_norm,
    get_norm_layer,
    resolve_ws,
)


@dataclass(frozen=True)
class ModelInfo:
    """Registry record: the builder and the facts summaries need. A model serves every dataset
    whose images have its `input_shape`; its head is sized to the dataset's class count."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W) the network accepts
    builder: Callable[..., nn.Module]
    default: bool  # the default model for datasets of this input shape
    description: str
    default_groups: int = DEFAULT_GROUPS  # GroupNorm groups when none are given

    def accepts(self, dataset: str) -> bool:
        """Whether this model takes the images of `dataset`."""
        return get_dataset(dataset).input_shape == self.input_shape


_REGISTRY: dict[str, ModelInfo] = {}


def register(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    default: bool = False,
    default_groups: int = DEFAULT_GROUPS,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a builder `fn(*, norm_layer, conv_layer, num_classes, dropout)`."""

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        if default and any(m.default and m.input_shape == input_shape for m in _REGISTRY.values()):
            raise ValueError(f"input shape {input_shape} already has a default model")
        doc = (fn.__doc__ or "").strip().split("\n\n")[0]
        description = " ".join(doc.split())
        _REGISTRY[name] = ModelInfo(name, input_shape, fn, default, description, default_groups)
        return fn

    return decorate


def list_models(dataset: str | None = None) -> list[str]:
    """Registered model names, optionally only those that accept `dataset`'s images."""
    return sorted(n for n, m in _REGISTRY.items() if dataset is None or m.accepts(dataset))


def get_model_info(name: str) -> ModelInfo:
    """The registry record of `name`; the error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise NormcliError(
            f"unknown model {name!r}; available: {', '.join(list_models())}"
        ) from None


def default_model(dataset: str) -> str:
    """The default model for `dataset`: the default one among those accepting its images."""
    for info in _REGISTRY.values():
        if info.default and info.accepts(dataset):
            return info.name
    shape = get_dataset(dataset).input_shape
    raise NormcliError(f"no registered model takes {dataset} images of shape {shape}")


def check_model_fits(name: str, dataset: str) -> None:
    """Refuse a model that does not take `dataset`'s images."""
    info = get_model_info(name)
    if not info.accepts(dataset):
        fits = ", ".join(list_models(dataset)) or "none"
        serves = ", ".join(d for d in DATASETS if info.accepts(d))
        raise NormcliError(
            f"model {name} takes images of shape {info.input_shape} ({serves}), not {dataset}'s "
            f"{get_dataset(dataset).input_shape}; models for {dataset}: {fits}"
        )


def norm_channels(name: str) -> dict[str, int]:
    """Channel count of every norm layer of model `name`, keyed by module path."""
    builder = get_model_info(name).builder
    with torch.device("meta"):  # structure only: no memory, no init cost
        probe = builder(norm_layer=nn.BatchNorm2d)
    return {n: m.num_features for n, m in probe.named_modules() if isinstance(m, nn.BatchNorm2d)}


def valid_groups(name: str) -> list[int]:
    """Group counts that divide the channels of every norm layer of model `name`."""
    channels = set(norm_channels(name).values())
    top = min(channels) if channels else 1
    return [g for g in range(1, top + 1) if all(c % g == 0 for c in channels)]


def check_groups(name: str, groups: int) -> None:
    """Refuse a group count that does not divide some norm layer's channels, naming it."""
    for layer, channels in norm_channels(name).items():
        if channels % groups:
            valid = ", ".join(map(str, valid_groups(name)))
            raise NormcliError(
                f"groups {groups} does not divide the {channels} channels of layer "
                f"{layer!r} in {name}; valid group counts: {valid}"
            )


def resolve_groups(name: str, norm: str, groups: int | None) -> int | None:
    """The group count `norm` gets in model `name`: `groups`, checked against its channels,
    or the model's default for gn; None for norms without groups."""
    if groups is None and get_norm(norm).takes_groups:
        groups = get_model_info(name).default_groups
    groups = check_norm(norm, groups)
    if groups is not None:
        check_groups(name, groups)
    return groups


def build_model(
    name: str,
    *,
    norm: str = "bn",
    groups: int | None = None,
    dropout: float | None = None,
    num_classes: int | None = None,
    ws: bool | None = None,
) -> nn.Module:
    """Build registered model `name` with the given norm, its convolutions weight-standardized
    when `ws` says so (None: the norm's default); None arguments keep the defaults."""
    builder = get_model_info(name).builder
    groups = resolve_groups(name, norm, groups)
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise NormcliError(f"dropout must be in [0, 1), got {dropout}")
    kwargs = {"dropout": dropout, "num_classes": num_classes}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    conv = conv_layer(resolve_ws(norm, ws))
    return builder(norm_layer=get_norm_layer(norm, groups), conv_layer=conv, **kwargs)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


class ConvBlock(nn.Sequential):
    """conv (no bias) -> norm -> ReLU -> optional dropout."""

    def __init__(
        self,
        cin: int,
        cout: int,
        norm_layer: NormLayer,
        *,
        conv_layer: type[nn.Conv2d] = nn.Conv2d,
        kernel_size: int = 3,
        padding: int = 0,
        dropout: float = 0.0,
    ) -> None:
        layers: dict[str, nn.Module] = {
            "conv": conv_layer(cin, cout, kernel_size, padding=padding, bias=False),
            "norm": norm_layer(cout),
            "act": nn.ReLU(inplace=True),
        }
        if dropout:
            layers["drop"] = nn.Dropout(dropout)
        super().__init__(OrderedDict(layers))  # named paths: block.conv, block.norm, ...


class Classifier(nn.Module):
    """Feature extractor, then global average pooling and a linear layer."""

    def __init__(self, features: nn.Sequential, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


# ---------------------------------------------------------------------------
# The networks
# ---------------------------------------------------------------------------


@register("mnist_net", input_shape=(1, 28, 28), default=True)
def mnist_net(
    *,
    norm_layer: NormLayer,
    conv_layer: type[nn.Conv2d] = nn.Conv2d,
    num_classes: int = 10,
    dropout: float = 0.0,
) -> nn.Module:
    """28x28 grey-scale CNN (MNIST, Fashion-MNIST, KMNIST), 8.9k parameters: two 3x3 convs,
    max-pool, 1x1 squeeze, four 3x3 convs, global average pooling."""
    # 28 -> 26 -> 24 (RF 5), pool -> 12, squeeze to 8, 12 -> 10 -> 8 -> 6, padded 6 (RF 22)
    widths = (8, 16, 8, 12, 16, 16, 16)
    return _grey_net(widths, norm_layer, conv_layer, num_classes, dropout)


@register("mnist_net_w16", input_shape=(1, 28, 28), default_groups=4)
def mnist_net_w16(
    *,
    norm_layer: NormLayer,
    conv_layer: type[nn.Conv2d] = nn.Conv2d,
    num_classes: int = 10,
    dropout: float = 0.0,
) -> nn.Module:
    """mnist_net at a constant width of 16 for the group-count study: every norm layer has 16
    channels, so GroupNorm takes G = 1 (= LN), 2, 4, 8 and 16 (= IN). Same budget rule as
    mnist_net (< 10k parameters: 9,978 with BN): one 3x3 conv fewer pays for the width."""
    # 28 -> 26 -> 24 (RF 5), pool -> 12, 1x1 mixing, 12 -> 10 -> 8, padded 8 (RF 18)
    return _grey_net((16,) * 6, norm_layer, conv_layer, num_classes, dropout)


def _grey_net(
    widths: tuple[int, ...],
    norm_layer: NormLayer,
    conv_layer: type[nn.Conv2d],
    num_classes: int,
    dropout: float,
) -> nn.Module:
    """The 28x28 networks, by the output channels of their convs: two 3x3, a max-pool, a 1x1,
    3x3s, and a last padded 3x3 without dropout (nothing is dropped before the head)."""

    def block(cin: int, cout: int, drop: float = dropout, **kw: int) -> ConvBlock:
        return ConvBlock(cin, cout, norm_layer, conv_layer=conv_layer, dropout=drop, **kw)

    first, second, mixed, *middle, last = widths
    layers = [block(1, first), block(first, second), nn.MaxPool2d(2)]
    layers.append(block(second, mixed, kernel_size=1))
    cin = mixed
    for cout in middle:
        layers.append(block(cin, cout))
        cin = cout
    layers.append(block(cin, last, drop=0.0, padding=1))
    return Classifier(nn.Sequential(*layers), last, num_classes)


# GroupNorm groups for cifar_net: 2 (8 of 16 channels per group up to 22 of 44) measured
# 80.5% against 79.9% with 4 (20 epochs; on cifar_net_p4 80.4% against 80.0%).
@register("cifar_net", input_shape=(3, 32, 32), default=True, default_groups=2)
def cifar_net(
    *,
    norm_layer: NormLayer,
    conv_layer: type[nn.Conv2d] = nn.Conv2d,
    num_classes: int = 10,
    dropout: float = 0.0,
) -> nn.Module:
    """32x32 colour CNN (CIFAR-10, CIFAR-100), 49.8k parameters with 10 classes: 3x3 convs
    at 32x32 (16 channels), 16x16 (16-32) and 8x8 (32-44-44), max-pools between, global average
    pooling over the 8x8 map."""
    return _cifar_net(norm_layer, conv_layer, num_classes, dropout, last_at_4x4=False)


@register("cifar_net_p4", input_shape=(3, 32, 32))
def cifar_net_p4(
    *,
    norm_layer: NormLayer,
    conv_layer: type[nn.Conv2d] = nn.Conv2d,
    num_classes: int = 10,
    dropout: float = 0.0,
) -> nn.Module:
    """cifar_net with a third max-pool before its last conv, which runs at 4x4 (the default
    until the last conv moved up to 8x8; the study's earlier runs used it)."""
    return _cifar_net(norm_layer, conv_layer, num_classes, dropout, last_at_4x4=True)


def _cifar_net(
    norm_layer: NormLayer,
    conv_layer: type[nn.Conv2d],
    num_classes: int,
    dropout: float,
    *,
    last_at_4x4: bool,
) -> nn.Module:
    def block(cin: int, cout: int, drop: float = dropout) -> ConvBlock:
        return ConvBlock(cin, cout, norm_layer, conv_layer=conv_layer, padding=1, dropout=drop)

    layers = [
        block(3, 16),  # 32x32, receptive field 3
        block(16, 16),  # 32x32, RF 5
        nn.MaxPool2d(2),  # -> 16x16
        block(16, 16),  # RF 10
        block(16, 32),  # RF 14
        nn.MaxPool2d(2),  # -> 8x8
        block(32, 32),  # RF 24
        block(32, 44),  # RF 32
    ]
    if last_at_4x4:  # its 17k weights then see 16 positions per image, mostly padding
        layers.append(nn.MaxPool2d(2))
    layers.append(block(44, 44, drop=0.0))  # RF 40 (52 at 4x4); no dropout before the head
    return Classifier(nn.Sequential(*layers), 44, num_classes)
