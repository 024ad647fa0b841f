"""Model summaries: torchinfo's layer table, parameters per norm, the registry listing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torchinfo
from torch import nn
from torchinfo.enums import Units

from normcli.data import DATASETS
from normcli.models import build_model, count_params, get_model_info, list_models, valid_groups
from normcli.norms import NORMS, get_norm

COLUMNS = ("output_size", "num_params", "mult_adds")


@dataclass
class LayerSummary:
    """torchinfo's statistics for one model, plus the facts that name it."""

    model: str
    norm: str
    groups: int | None
    input_shape: tuple[int, ...]
    stats: torchinfo.ModelStatistics

    @property
    def table(self) -> str:
        return str(self.stats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "norm": self.norm,
            "groups": self.groups,
            "input_shape": list(self.input_shape),
            "total_params": self.stats.total_params,
            "trainable_params": self.stats.trainable_params,
            "mult_adds": self.stats.total_mult_adds,
            "layers": [
                {
                    "name": layer.get_layer_name(show_var_name=True, show_depth=False),
                    "depth": layer.depth,
                    "output_shape": layer.output_size,
                    "params": layer.num_params,
                    "mult_adds": layer.macs,
                }
                for layer in self.stats.summary_list
            ],
        }


def layer_summary(model: nn.Module, name: str, norm: str, groups: int | None) -> LayerSummary:
    """torchinfo table of `model` (registry name `name`) on one image of its dataset's shape."""
    shape = (1, *get_model_info(name).input_shape)
    stats = torchinfo.summary(
        model, input_size=shape, col_names=COLUMNS, depth=3, verbose=0, device="cpu"
    )
    # The exact count: torchinfo's automatic unit prints as "(Units.MEGABYTES)" on Python 3.11+.
    stats.formatting.macs_units = Units.NONE
    return LayerSummary(name, norm, groups, shape, stats)


def params_per_norm(name: str, groups: int | None = None) -> dict[str, int]:
    """Trainable parameter count of model `name` for every norm."""
    return {
        norm: count_params(
            build_model(name, norm=norm, groups=groups if get_norm(norm).takes_groups else None)
        )
        for norm in NORMS
    }


def registry_table() -> list[dict[str, Any]]:
    """One record per registered model: input shape, the datasets it serves, default flag,
    params per norm (10 classes) and per dataset served (bn), valid groups."""
    rows = []
    for name in list_models():
        info = get_model_info(name)
        served = [d for d in DATASETS if info.accepts(d)]
        rows.append(
            {
                "name": name,
                "input_shape": list(info.input_shape),
                "datasets": served,
                "params_per_dataset": {
                    d: count_params(build_model(name, num_classes=DATASETS[d].num_classes))
                    for d in served
                },
                "default": info.default,
                "params": params_per_norm(name),
                "default_groups": info.default_groups,
                "valid_groups": valid_groups(name),
                "description": info.description,
            }
        )
    return rows
