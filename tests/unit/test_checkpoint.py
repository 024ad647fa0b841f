"""Checkpoints: weights, buffers, extra tensors and every metadata field survive a round trip;
writes are atomic."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from normcli import checkpoint
from normcli.checkpoint import CheckpointMeta, load_checkpoint, read_metadata, save_checkpoint
from normcli.config import RunSpec
from normcli.data import get_dataset
from normcli.errors import NormcliError
from normcli.models import build_model, get_model_info
from normcli.tuning import choose, settle


def _history(epochs: int) -> list[dict[str, float]]:
    return [
        {
            "epoch": e,
            "train_loss": 2.0 / e + 0.1 + 0.2,  # not exactly representable: must survive JSON
            "train_accuracy": 100 / 3 + e,
            "test_loss": 1.0 / 7 * e,
            "test_accuracy": 12.5 * e,
            "lr": 0.05 * 0.9**e,
            "seconds": 1.25,
            "images_per_second": 1e4 / 3,
        }
        for e in range(1, epochs + 1)
    ]


def _meta(
    name: str, norm: str, groups: int | None, dropout: float, ws: bool = False
) -> CheckpointMeta:
    dataset = {(1, 28, 28): "mnist", (3, 32, 32): "cifar10"}[get_model_info(name).input_shape]
    spec = get_dataset(dataset)
    run = RunSpec.from_options(
        dataset=dataset, model=name, norm=norm, groups=groups, ws=ws, dropout=dropout,
        l1=1e-4, seed=7, epochs=3,
    ).resolve()  # fmt: skip
    run = settle(run, choose(run, torch.device("cpu"), measure=False))  # as a run records it
    return CheckpointMeta(
        model_args=run.model,
        train_args=run.train,
        class_names=list(spec.class_names),
        input_shape=list(spec.input_shape),
        mean=list(spec.mean),
        std=list(spec.std),
        history=_history(3),
        resume={"epoch": 3, "steps_per_epoch": 10},
    )


def _trained_model(
    name: str, norm: str, groups: int | None, dropout: float, ws: bool = False
) -> nn.Module:
    """A model whose weights and running statistics are all far from their initial values."""
    torch.manual_seed(11)
    model = build_model(name, norm=norm, groups=groups, dropout=dropout, ws=ws)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    model.train()
    shape = get_model_info(name).input_shape
    with torch.no_grad():
        for _ in range(3):  # updates BN running_mean / running_var / num_batches_tracked
            model(torch.randn(8, *shape) * 2 + 0.5)
    return model.eval()


CASES = [
    ("mnist_net", "bn", None, 0.0, False),
    ("mnist_net", "gn", 2, 0.1, True),
    ("cifar_net", "bn", None, 0.2, True),
    ("cifar_net", "ln", None, 0.0, False),
    ("cifar_net", "in", None, 0.0, True),
    ("mnist_net", "none", None, 0.0, False),
]


@pytest.mark.parametrize(("name", "norm", "groups", "dropout", "ws"), CASES)
def test_round_trip_keeps_weights_buffers_metadata_and_outputs(
    tmp_path: Path, name: str, norm: str, groups: int | None, dropout: float, ws: bool
) -> None:
    model = _trained_model(name, norm, groups, dropout, ws)
    meta = _meta(name, norm, groups, dropout, ws)
    extra = {"optim.0.momentum_buffer": torch.randn(3, 4), "rng.data": torch.arange(5)}
    path = tmp_path / "run.safetensors"

    assert save_checkpoint(path, model, meta, extra) == path
    loaded = load_checkpoint(path)

    before, after = model.state_dict(), loaded.model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key
    if norm == "bn":
        tracked = [k for k in before if k.endswith("num_batches_tracked")]
        assert tracked and all(int(after[k]) == 3 for k in tracked)
        means = [k for k in before if k.endswith("running_mean")]
        assert means and all(after[k].abs().sum() > 0 for k in means)

    assert loaded.extra.keys() == extra.keys()
    for key, value in extra.items():
        assert torch.equal(loaded.extra[key], value)

    for read in (loaded.meta, read_metadata(path)):
        assert dataclasses.asdict(read) == dataclasses.asdict(meta)
        for f in dataclasses.fields(CheckpointMeta):
            assert getattr(read, f.name) == getattr(meta, f.name), f.name
            # Same type, up to subclasses (torch.__version__ is a str subclass).
            assert isinstance(getattr(meta, f.name), type(getattr(read, f.name))), f.name

    assert not loaded.model.training
    x = torch.randn(5, *get_dataset(meta.dataset).input_shape)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_metadata_alone_rebuilds_the_architecture(tmp_path: Path) -> None:
    model = _trained_model("mnist_net", "gn", 2, 0.0)
    save_checkpoint(tmp_path / "a.safetensors", model, _meta("mnist_net", "gn", 2, 0.0))
    loaded = load_checkpoint(tmp_path / "a.safetensors").model
    assert [m.num_groups for m in loaded.modules() if isinstance(m, nn.GroupNorm)] == [2] * 7


def test_save_leaves_only_the_checkpoint_in_the_folder(tmp_path: Path) -> None:
    model = _trained_model("mnist_net", "bn", None, 0.0)
    path = tmp_path / "run.safetensors"
    save_checkpoint(path, model, _meta("mnist_net", "bn", None, 0.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]

    # Overwriting replaces the content, still without leftovers.
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(path, model, _meta("mnist_net", "bn", None, 0.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]
    assert torch.equal(
        load_checkpoint(path).model.state_dict()["features.0.conv.weight"],
        model.state_dict()["features.0.conv.weight"],
    )


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _trained_model("mnist_net", "bn", None, 0.0)
    path = tmp_path / "run.safetensors"
    save_checkpoint(path, model, _meta("mnist_net", "bn", None, 0.0))
    original = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the write

    monkeypatch.setattr(checkpoint, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, _meta("mnist_net", "ln", None, 0.0))

    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]


def test_the_temp_file_is_in_the_target_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # os.replace is only atomic within one file system: the temp file must sit next to the target.
    seen: list[Path] = []
    real_save = checkpoint.save_file

    def spy(tensors, filename, metadata=None):
        seen.append(Path(filename))
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", spy)
    meta = _meta("mnist_net", "bn", None, 0.0)
    save_checkpoint(tmp_path / "run.safetensors", build_model("mnist_net"), meta)
    assert len(seen) == 1
    assert seen[0].parent == tmp_path and seen[0].name != "run.safetensors"
    assert not seen[0].exists()


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x10\0\0\0\0\0\0\0{not json}"])
def test_non_checkpoints_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(NormcliError, match="x.safetensors"):
        read_metadata(path)
    with pytest.raises(NormcliError, match="x.safetensors"):
        load_checkpoint(path)


def test_a_safetensors_file_without_normcli_metadata_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(NormcliError, match="not a normcli checkpoint"):
        read_metadata(tmp_path / "plain.safetensors")


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    # The metadata says mnist_net, but the tensors are cifar_net's.
    path = tmp_path / "x.safetensors"
    save_checkpoint(path, build_model("cifar_net"), _meta("mnist_net", "bn", None, 0.0))
    with pytest.raises(NormcliError, match="do not match|shape"):
        load_checkpoint(path)


def test_a_file_from_before_weight_standardization_loads_with_plain_convs(tmp_path: Path) -> None:
    """Format 1, as normcli wrote it before the option existed: no ws anywhere."""
    model = _trained_model("mnist_net", "gn", 2, 0.0)
    path = tmp_path / "old.safetensors"
    meta = _meta("mnist_net", "gn", 2, 0.0)
    config = {**dataclasses.asdict(meta.train_args), "dataset": "mnist", "model": "mnist_net",
              "norm": "gn", "groups": 2, "dropout": 0.0}  # fmt: skip
    for added in ("val", "threads"):
        config.pop(added)
    v1 = {"format_version": 1, "model": "mnist_net", "norm": "gn", "groups": 2, "dropout": 0.0,
          "dataset": "mnist", "class_names": meta.class_names, "input_shape": meta.input_shape,
          "mean": meta.mean, "std": meta.std, "config": config, "history": meta.history,
          "normcli_version": "0.1.0", "torch_version": "2.14.1", "created": meta.created}
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in v1.items()})

    loaded = load_checkpoint(path)
    assert loaded.meta.model_args.ws is False
    assert loaded.meta.train_args == dataclasses.replace(meta.train_args, threads=None)
    assert {type(m) for m in loaded.model.modules() if isinstance(m, nn.Conv2d)} == {nn.Conv2d}
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
