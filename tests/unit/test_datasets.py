"""The dataset records: Fashion-MNIST, KMNIST and CIFAR-100 in their official formats and
folders, their offline download error, CIFAR-100's 100-way head, and the one-record rule
(a dataset registered here, in one record, trains and evaluates end to end)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE

from normcli import data
from normcli.checkpoint import load_checkpoint
from normcli.config import RunSpec
from normcli.data import IdxDataset, Split, get_dataset, load_split, write_synthetic
from normcli.errors import NormcliError
from normcli.evaluate import report
from normcli.models import build_model, count_params
from normcli.train import train as train_run


def _idx(data_: torch.Tensor) -> bytes:
    """An IDX file written here, independently of the library's writer."""
    dims = b"".join(struct.pack(">I", d) for d in data_.shape)
    return bytes([0, 0, 8, data_.ndim]) + dims + data_.numpy().tobytes()


def _random(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, classes, (n,), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(("name", "folder"), [("fashion_mnist", "FashionMNIST"),
                                              ("kmnist", "KMNIST")])  # fmt: skip
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gz"])
def test_idx_datasets_read_their_official_folder(
    tmp_path: Path, name: str, folder: str, compress: bool
) -> None:
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    written = {}
    for prefix, train, n in (("train", True, 12), ("t10k", False, 7)):
        images, labels = _random(n, 10, seed=n)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            content, file = _idx(array), raw / f"{prefix}-{kind}-ubyte"
            if compress:
                file.with_name(file.name + ".gz").write_bytes(gzip.compress(content))
            else:
                file.write_bytes(content)
        written[train] = (images, labels)
    for train, (images, labels) in written.items():
        split = load_split(name, train, tmp_path, download_missing=False)
        assert torch.equal(split.images[:, 0], images)
        assert torch.equal(split.labels, labels.long())
    # MNIST's files in the folder do not stand in for another dataset's
    assert not (tmp_path / "MNIST").exists()
    with pytest.raises(NormcliError, match="mnist not found"):
        load_split("mnist", True, tmp_path, download_missing=False)


def test_the_idx_datasets_have_their_class_names() -> None:
    assert get_dataset("fashion_mnist").class_names[0] == "T-shirt/top"
    assert get_dataset("fashion_mnist").class_names[9] == "Ankle boot"
    assert get_dataset("kmnist").class_names == (
        "o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"
    )  # fmt: skip
    for name in ("mnist", "fashion_mnist", "kmnist"):
        spec = get_dataset(name)
        assert spec.input_shape == (1, 28, 28) and spec.num_classes == 10
        assert [r.filename for r in spec.resources] == [
            "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
        ]  # fmt: skip
        assert all(len(r.md5) == 32 and r.urls for r in spec.resources)
    md5s = [{r.md5 for r in get_dataset(n).resources} for n in ("mnist", "fashion_mnist", "kmnist")]
    assert not (md5s[0] & md5s[1] or md5s[0] & md5s[2] or md5s[1] & md5s[2])


def _cifar100_records(images: torch.Tensor, coarse: list[int], fine: list[int]) -> bytes:
    out = b""
    for img, c, f in zip(images, coarse, fine, strict=True):
        out += bytes([c, f]) + img.numpy().tobytes()
    return out


def test_cifar100_binary_reads_the_fine_label(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 32, 32), generator=g, dtype=torch.uint8)
    coarse, fine = [3, 19, 0, 7, 11], [99, 0, 42, 7, 58]
    (folder / "train.bin").write_bytes(_cifar100_records(images, coarse, fine))
    (folder / "test.bin").write_bytes(_cifar100_records(images[:2], coarse[:2], fine[:2]))
    (folder / "fine_label_names.txt").write_text("\n".join(data.CIFAR100_CLASSES) + "\n")
    train_split = load_split("cifar100", True, tmp_path, download_missing=False)
    assert train_split.labels.tolist() == fine
    assert torch.equal(train_split.images, images)
    assert load_split("cifar100", False, tmp_path, download_missing=False).labels.tolist() == [
        99,
        0,
    ]
    assert len(get_dataset("cifar100").class_names) == 100
    assert get_dataset("cifar100").class_names[99] == "worm"

    (folder / "test.bin").write_bytes(_cifar100_records(images[:1], [0], [100]))
    with pytest.raises(NormcliError, match="label 100 out of range 0-99"):
        load_split("cifar100", False, tmp_path, download_missing=False)
    (folder / "test.bin").write_bytes(b"\0" * 3073)  # a CIFAR-10 record: one byte short
    with pytest.raises(NormcliError, match="3074-byte"):
        load_split("cifar100", False, tmp_path, download_missing=False)


def test_cifar100_python_version_through_the_restricted_unpickler(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name, n in (("train", 6), ("test", 4)):
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        batch = {b"data": pixels, b"fine_labels": fine, b"coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
        batches[name == "train"] = (pixels, fine)
    for train, (pixels, fine) in batches.items():
        split = load_split("cifar100", train, tmp_path, download_missing=False)
        assert split.labels.tolist() == fine
        assert torch.equal(split.images.reshape(len(fine), -1), torch.from_numpy(pixels))


@pytest.mark.parametrize(
    ("name", "where"),
    [("fashion_mnist", "FashionMNIST/raw"), ("kmnist", "KMNIST/raw"),
     ("cifar100", "cifar-100-binary")],
)  # fmt: skip
def test_new_datasets_offline_give_one_clear_line_and_leave_nothing(
    cli, tmp_path: Path, name: str, where: str
) -> None:
    root = tmp_path / "data"
    result = cli(
        "train", "--dataset", name, "--data-dir", root, "--epochs", "1", "--device", "cpu",
        "--out", tmp_path / "x.safetensors", env=OFFLINE,
    )  # fmt: skip
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{name} not found" in lines[0] and where in lines[0]
    assert "download failed" in lines[0]
    assert not (tmp_path / "x.safetensors").exists()
    leftovers = [p for p in root.rglob("*")] if root.exists() else []
    assert leftovers == []  # the failed download removed what it created


def test_cifar100_trains_a_100_way_head_and_summary_prices_it(cli, tmp_path: Path) -> None:
    root = write_synthetic("cifar100", tmp_path / "data", n_train=200, n_test=100)
    out = tmp_path / "c100.safetensors"
    result = cli(
        "train", "--dataset", "cifar100", "--data-dir", root, "--epochs", "1", "--device", "cpu",
        "--batch-size", "50", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    ckpt = load_checkpoint(out)
    assert ckpt.meta.model_args.model == "cifar_net" and ckpt.meta.model_args.num_classes == 100
    logits = ckpt.model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 100)
    ten = count_params(build_model("cifar_net", num_classes=10))
    hundred = count_params(ckpt.model)
    assert hundred - ten == 90 * (44 + 1)  # 90 more rows of the 44-wide linear head
    summary = cli("summary", out, "--json")
    assert summary.exit_code == 0, summary.stderr
    assert json.loads(summary.stdout)["trainable_params"] == hundred
    listing = json.loads(cli("summary", "--list", "--json").stdout)
    row = next(r for r in listing if r["name"] == "cifar_net")
    assert row["params_per_dataset"]["cifar100"] == hundred
    assert "cifar100" in row["datasets"] and "mnist" not in row["datasets"]


def test_one_record_adds_a_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-record rule: a new dataset of a known format is one record; training,
    checkpoints and evaluation need nothing else."""
    glyphs = dataclasses.replace(
        data.MNIST, name="glyphs", title="Glyphs", folder="Glyphs", search_root=False,
        class_names=("circle", "square", "cross"), mean=(0.2,), std=(0.3,),
        train_size=90, test_size=30, resources=(),
    )  # fmt: skip
    assert isinstance(glyphs, IdxDataset)
    monkeypatch.setitem(data.DATASETS, "glyphs", glyphs)
    write_synthetic("glyphs", tmp_path, n_train=90, n_test=30)
    assert (tmp_path / "Glyphs" / "raw" / "train-images-idx3-ubyte").is_file()

    spec = RunSpec.from_options(dataset="glyphs", norm="gn", epochs=1, batch_size=30)
    out = tmp_path / "glyphs.safetensors"
    result = train_run(spec, data_dir=tmp_path, device="cpu", out=out)
    assert len(result.history) == 1
    ckpt = load_checkpoint(out)
    assert ckpt.meta.model_args.model == "mnist_net"  # chosen by the input shape
    assert ckpt.meta.class_names == ["circle", "square", "cross"]
    assert ckpt.model(torch.zeros(1, 1, 28, 28)).shape == (1, 3)
    test = load_split("glyphs", False, tmp_path)
    rep = report(ckpt, test)
    assert rep.metrics.total == 30 and len(rep.metrics.confusion) == 3
    assert rep.metrics.accuracy == pytest.approx(result.history[-1]["test_accuracy"])


def test_a_model_that_does_not_take_the_images_is_refused() -> None:
    with pytest.raises(NormcliError, match=r"cifar_net takes images of shape \(3, 32, 32\)"):
        RunSpec.from_options(dataset="kmnist", model="cifar_net").resolve()


def test_synthetic_data_round_trips_through_every_format(tmp_path: Path) -> None:
    for name, spec in data.DATASETS.items():
        write_synthetic(name, tmp_path / name, n_train=20, n_test=10)
        split = load_split(name, True, tmp_path / name, download_missing=False)
        assert isinstance(split, Split) and len(split) == 20
        assert tuple(split.images.shape[1:]) == spec.input_shape
        assert int(split.labels.max()) < spec.num_classes
