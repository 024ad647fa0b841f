"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written or changed.

Every case runs the real CLI entry point in-process, from inside its own
temporary folder, offline (a dead proxy makes any download attempt fail at
once). The temporary folder, the shared tiny data and the shared checkpoints
are snapshotted before and after: not a byte, file or folder may change.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import OFFLINE
from safetensors.torch import save_file

from normcli.checkpoint import read_file


@dataclass
class Env:
    """What a case may use: its own folder, a copy of a good checkpoint, the tiny data."""

    tmp: Path
    data: Path  # the shared tiny data: read only
    ckpt: Path  # a copy of a good mnist checkpoint (bn + L1, with resume state) inside tmp

    def train(self, *extra: str | Path, out: Path | None = None) -> list[str | Path]:
        out = out or self.tmp / "new.safetensors"
        return [
            "train", "--data-dir", self.data, "--epochs", "1", "--batch-size", "32",
            "--device", "cpu", "--out", out, *extra,
        ]  # fmt: skip

    def eval(self, ckpt: str | Path, *extra: str | Path) -> list[str | Path]:
        return ["eval", ckpt, "--data-dir", self.data, "--device", "cpu", *extra]

    def variant(
        self,
        meta: dict[str, str | None] | None = None,
        tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        name: str = "variant.safetensors",
    ) -> Path:
        """A copy of the good checkpoint with metadata entries replaced (None: removed)."""
        raw, values = read_file(self.ckpt)
        raw = dict(raw or {})
        for key, value in (meta or {}).items():
            if value is None:
                raw.pop(key, None)
            else:
                raw[key] = value
        if tensors is not None:
            values = tensors(values)
        path = self.tmp / name
        save_file(values, str(path), metadata=raw)
        return path

    def data_copy(self, *parts: str) -> Path:
        """A private copy of one dataset's folder of the tiny data, to corrupt."""
        root = self.tmp / "data"
        shutil.copytree(self.data.joinpath(*parts), root.joinpath(*parts))
        return root


Builder = Callable[[Env], tuple[list[str | Path], list[str]]]
CASES: list = []


def case(name: str, *expected: str) -> Callable[[Callable[[Env], list[str | Path]]], None]:
    """Register a bad-input case: a function of Env giving the CLI arguments."""

    def register(build: Callable[[Env], list[str | Path]]) -> None:
        CASES.append(pytest.param(build, list(expected), id=name))

    return register


def simple(name: str, args: Callable[[Env], list[str | Path]], *expected: str) -> None:
    CASES.append(pytest.param(args, list(expected), id=name))


# --- training options -------------------------------------------------------------------------

simple("unknown-dataset", lambda e: e.train("--dataset", "svhn"), "'svhn'", "mnist", "cifar10")
simple(
    "unknown-model",
    lambda e: e.train("--model", "resnet50"),
    "unknown model 'resnet50'",
    "mnist_net",
    "cifar_net",
)
simple("model-of-other-dataset", lambda e: e.train("--model", "cifar_net"), "cifar10")
simple("unknown-norm", lambda e: e.train("--norm", "batch"), "'batch'", "'bn'", "'gn'", "'ln'")
simple(
    "groups-not-dividing",
    lambda e: e.train("--norm", "gn", "--groups", "3"),
    "--groups 3 does not divide",
    "channels",
    "valid group counts: 1, 2, 4",
)
simple(
    "groups-not-dividing-cifar",
    lambda e: e.train("--dataset", "cifar10", "--norm", "gn", "--groups", "5"),
    "--groups 5 does not divide",
)
simple("groups-zero", lambda e: e.train("--norm", "gn", "--groups", "0"), "--groups")
simple("groups-with-bn", lambda e: e.train("--norm", "bn", "--groups", "2"), "--groups", "gn only")
simple("groups-with-ln", lambda e: e.train("--norm", "ln", "--groups", "2"), "--groups", "gn only")
simple("groups-with-none", lambda e: e.train("--norm", "none", "--groups", "4"), "gn only")
simple("epochs-zero", lambda e: e.train("--epochs", "0"), "--epochs must be positive")
simple("epochs-negative", lambda e: e.train("--epochs", "-2"), "--epochs must be positive")
simple("epochs-not-a-number", lambda e: e.train("--epochs", "two"), "--epochs", "integer")
simple("batch-size-zero", lambda e: e.train("--batch-size", "0"), "--batch-size must be positive")
simple("batch-size-negative", lambda e: e.train("--batch-size", "-32"), "--batch-size")
simple("lr-zero", lambda e: e.train("--lr", "0"), "--lr must be positive")
simple("lr-negative", lambda e: e.train("--lr", "-0.1"), "--lr must be positive")
simple("lr-nan", lambda e: e.train("--lr", "nan"), "--lr must be positive")
simple("l1-negative", lambda e: e.train("--l1", "-1e-4"), "--l1", "non-negative")
simple("weight-decay-negative", lambda e: e.train("--weight-decay", "-1"), "--weight-decay")
simple("dropout-out-of-range", lambda e: e.train("--dropout", "1.5"), "--dropout")
simple("limit-zero", lambda e: e.train("--limit", "0"), "--limit must be a positive")
simple("limit-negative", lambda e: e.train("--limit", "-5"), "--limit must be a positive")
simple("unknown-device", lambda e: e.train("--device", "tpu"), "'tpu'", "cpu", "cuda")
simple("unknown-option", lambda e: e.train("--epoch", "3"), "--epoch")

# --- data folders and data files -------------------------------------------------------------


@case("data-folder-empty", "mnist not found", "download failed")
def _(e: Env) -> list[str | Path]:
    (e.tmp / "empty").mkdir()
    return [*e.train(), "--data-dir", e.tmp / "empty"]


@case("data-folder-missing", "cifar10 not found", "download failed")
def _(e: Env) -> list[str | Path]:
    return [*e.train("--dataset", "cifar10"), "--data-dir", e.tmp / "no" / "such" / "folder"]


@case("data-folder-is-a-file", "mnist not found")
def _(e: Env) -> list[str | Path]:
    (e.tmp / "notes.txt").write_text("not a folder\n")
    return [*e.train(), "--data-dir", e.tmp / "notes.txt"]


@case("data-folder-half-there", "mnist not found")
def _(e: Env) -> list[str | Path]:
    root = e.data_copy("MNIST")
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()  # the test labels are missing
    return [*e.train(), "--data-dir", root]


def _corrupt_mnist(name: str, edit: Callable[[bytes], bytes]) -> Builder:
    def build(e: Env) -> list[str | Path]:
        root = e.data_copy("MNIST")
        path = root / "MNIST" / "raw" / name
        path.write_bytes(edit(path.read_bytes()))
        return [*e.train(), "--data-dir", root]

    return build


simple(
    "mnist-wrong-magic",
    _corrupt_mnist("train-images-idx3-ubyte", lambda b: b"\x00\x00\x0d" + b[3:]),
    "train-images-idx3-ubyte",
    "wrong magic number",
)
simple(
    "mnist-not-idx",
    _corrupt_mnist("t10k-labels-idx1-ubyte", lambda b: b"PK\x03\x04" + b[4:]),
    "t10k-labels-idx1-ubyte",
    "wrong magic number",
)
simple(
    "mnist-truncated",
    _corrupt_mnist("train-images-idx3-ubyte", lambda b: b[: len(b) // 2]),
    "train-images-idx3-ubyte",
    "wrong size",
)
simple(
    "mnist-too-long",
    _corrupt_mnist("train-labels-idx1-ubyte", lambda b: b + b"\x01\x02"),
    "train-labels-idx1-ubyte",
    "wrong size",
)
simple(
    "mnist-header-only",
    _corrupt_mnist("train-images-idx3-ubyte", lambda b: b[:6]),
    "train-images-idx3-ubyte",
    "truncated",
)
simple(
    "mnist-empty-file",
    _corrupt_mnist("t10k-images-idx3-ubyte", lambda b: b""),
    "t10k-images-idx3-ubyte",
    "wrong magic number",
)
simple(
    "mnist-label-out-of-range",
    _corrupt_mnist("train-labels-idx1-ubyte", lambda b: b[:8] + b"\x0c" + b[9:]),
    "train-labels-idx1-ubyte",
    "label 12 out of range",
)
simple(
    "mnist-count-mismatch",
    _corrupt_mnist("train-labels-idx1-ubyte", lambda b: b[:4] + struct.pack(">I", 199) + b[8:-1]),
    "do not match",
)


@case("mnist-bad-gzip", "train-images-idx3-ubyte.gz", "not a valid gzip file")
def _(e: Env) -> list[str | Path]:
    root = e.data_copy("MNIST")
    raw = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    packed = gzip.compress(raw.read_bytes())
    raw.unlink()
    raw.with_name(raw.name + ".gz").write_bytes(packed[: len(packed) // 2])  # cut short
    return [*e.train(), "--data-dir", root]


@case("mnist-gzip-bad-stream", "t10k-labels-idx1-ubyte.gz", "not a valid gzip file")
def _(e: Env) -> list[str | Path]:
    root = e.data_copy("MNIST")
    raw = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    packed = bytearray(gzip.compress(raw.read_bytes()))
    packed[10] = 0xFF  # the first deflate block header: block type 3 does not exist
    raw.unlink()
    raw.with_name(raw.name + ".gz").write_bytes(bytes(packed))
    return [*e.train(), "--data-dir", root]


@case("mnist-file-too-large", "train-images-idx3-ubyte", "too large")
def _(e: Env) -> list[str | Path]:
    root = e.data_copy("MNIST")
    with (root / "MNIST" / "raw" / "train-images-idx3-ubyte").open("r+b") as f:
        f.truncate(300 * 1024**2)  # sparse: 300 MB on paper
    return [*e.train(), "--data-dir", root]


@case("cifar-bin-wrong-size", "data_batch_3.bin", "wrong size")
def _(e: Env) -> list[str | Path]:
    root = e.data_copy("cifar-10-batches-bin")
    path = root / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    return [*e.train("--dataset", "cifar10"), "--data-dir", root]


@case("cifar-bin-bad-label", "test_batch.bin", "out of range")
def _(e: Env) -> list[str | Path]:
    root = e.data_copy("cifar-10-batches-bin")
    path = root / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(b"\xff" + path.read_bytes()[1:])
    return [*e.train("--dataset", "cifar10"), "--data-dir", root]


def _cifar_py(e: Env, test_batch: bytes) -> Path:
    """A cifar-10-batches-py folder: good training batches, the given test batch."""
    folder = e.tmp / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batch = {b"data": torch.zeros(4, 3072, dtype=torch.uint8).numpy(), b"labels": [0, 1, 2, 3]}
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=4))
    (folder / "test_batch").write_bytes(test_batch)
    return folder.parent


class _Evil:
    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, ("touch pwned",))


@case("cifar-py-forbidden-global", "test_batch", "not a CIFAR-10 python batch", "forbidden")
def _(e: Env) -> list[str | Path]:
    root = _cifar_py(e, pickle.dumps({b"data": _Evil(), b"labels": []}))
    return [*e.train("--dataset", "cifar10"), "--data-dir", root]


@case("cifar-py-truncated", "test_batch", "not a CIFAR-10 python batch")
def _(e: Env) -> list[str | Path]:
    good = pickle.dumps(
        {b"data": torch.zeros(2, 3072, dtype=torch.uint8).numpy(), b"labels": [1, 2]}
    )
    root = _cifar_py(e, good[: len(good) // 2])
    return [*e.train("--dataset", "cifar10"), "--data-dir", root]


@case("cifar-py-wrong-shape", "test_batch", "shape")
def _(e: Env) -> list[str | Path]:
    root = _cifar_py(
        e,
        pickle.dumps({b"data": torch.zeros(2, 100, dtype=torch.uint8).numpy(), b"labels": [1, 2]}),
    )
    return [*e.train("--dataset", "cifar10"), "--data-dir", root]


@case("eval-data-corrupted", "t10k-images-idx3-ubyte", "wrong size")
def _(e: Env) -> list[str | Path]:
    root = _corrupt_mnist("t10k-images-idx3-ubyte", lambda b: b[:-1])(e)[-1]
    return [*e.eval(e.ckpt), "--data-dir", root]


# --- checkpoints, through eval / misclassified / plot / summary / train --resume --------------


simple(
    "ckpt-missing", lambda e: e.eval(e.tmp / "nope.safetensors"), "nope.safetensors", "no such file"
)
simple("ckpt-directory", lambda e: e.eval(e.tmp / "run"), "no such file")


@case("ckpt-directory-without-checkpoints", "no .safetensors checkpoints in this folder")
def _(e: Env) -> list[str | Path]:
    (e.tmp / "empty").mkdir()
    return e.eval(e.tmp / "empty")


@case("ckpt-empty-file", "empty file")
def _(e: Env) -> list[str | Path]:
    (e.tmp / "empty.safetensors").touch()
    return e.eval(e.tmp / "empty.safetensors")


@case("ckpt-not-safetensors", "not a safetensors file")
def _(e: Env) -> list[str | Path]:
    (e.tmp / "notes.safetensors").write_text("these are my notes, not a checkpoint\n" * 3)
    return e.eval(e.tmp / "notes.safetensors")


@case("ckpt-pickle", "not a safetensors file")
def _(e: Env) -> list[str | Path]:
    (e.tmp / "model.pt").write_bytes(pickle.dumps({"state_dict": [1, 2, 3]}))
    return e.eval(e.tmp / "model.pt")


@case("ckpt-header-claims-gigabytes", "not a safetensors file")
def _(e: Env) -> list[str | Path]:
    (e.tmp / "huge.safetensors").write_bytes(struct.pack("<Q", 5 * 1024**3) + b'{"a":' + b" " * 64)
    return e.eval(e.tmp / "huge.safetensors")


@case("ckpt-header-over-limit", "not a safetensors file")
def _(e: Env) -> list[str | Path]:
    path = e.tmp / "big-header.safetensors"  # sparse: 40 MB on paper, a few bytes on disk
    with path.open("wb") as f:
        f.write(struct.pack("<Q", 32 * 1024**2) + b"{")
        f.truncate(40 * 1024**2)
    return e.eval(path)


@case("ckpt-file-too-large", "too large")
def _(e: Env) -> list[str | Path]:
    path = e.tmp / "huge.safetensors"  # sparse
    with path.open("wb") as f:
        f.write(e.ckpt.read_bytes())
        f.truncate(3 * 1024**3)
    return e.eval(path)


@case("ckpt-truncated", "not a valid safetensors file")
def _(e: Env) -> list[str | Path]:
    raw = e.ckpt.read_bytes()
    (e.tmp / "cut.safetensors").write_bytes(raw[: len(raw) - 500])
    return e.eval(e.tmp / "cut.safetensors")


@case("ckpt-truncated-in-header", "not a safetensors file")
def _(e: Env) -> list[str | Path]:
    (e.tmp / "cut.safetensors").write_bytes(e.ckpt.read_bytes()[:200])
    return e.eval(e.tmp / "cut.safetensors")


@case("ckpt-no-metadata", "not a normcli checkpoint")
def _(e: Env) -> list[str | Path]:
    save_file({"w": torch.zeros(3)}, str(e.tmp / "plain.safetensors"))
    return e.eval(e.tmp / "plain.safetensors")


@case("ckpt-foreign-metadata", "not a normcli checkpoint")
def _(e: Env) -> list[str | Path]:
    save_file({"w": torch.zeros(3)}, str(e.tmp / "hf.safetensors"), metadata={"format": "pt"})
    return e.eval(e.tmp / "hf.safetensors")


def _meta_case(name: str, meta: dict[str, str | None], *expected: str) -> None:
    simple(name, lambda e: e.eval(e.variant(meta)), *expected)


def _args_case(name: str, key: str, edit: Callable[[dict], None], *expected: str) -> None:
    """`eval` on a checkpoint whose run record `key` (model_args / train_args) was edited."""

    def build(e: Env) -> list[str | Path]:
        raw, _ = read_file(e.ckpt)
        value = json.loads(raw[key])
        edit(value)
        return e.eval(e.variant({key: json.dumps(value)}))

    simple(name, build, *expected)


_meta_case("meta-incomplete", {"model_args": None}, "incomplete normcli metadata", "'model_args'")
_meta_case("meta-no-history", {"history": None}, "incomplete normcli metadata", "'history'")
_meta_case("meta-malformed-json", {"model_args": '{"norm": "bn'}, "'model_args' is not valid JSON")
_meta_case(
    "meta-malformed-json-config", {"train_args": "{'epochs': 2}"}, "'train_args' is not valid JSON"
)
_meta_case("meta-huge-integer", {"format_version": "9" * 5000}, "'format_version' is not valid")
_meta_case("meta-deep-nesting", {"train_args": "[" * 100_000 + "]" * 100_000}, "'train_args'")
_args_case("meta-incomplete-model-args", "model_args", lambda m: m.pop("model"), "'model' missing")
_args_case(
    "meta-wrong-type-groups", "model_args", lambda m: m.update(groups="two"),
    "'groups' has the wrong type",
)  # fmt: skip
_meta_case("meta-wrong-type-bool", {"format_version": "true"}, "unknown checkpoint format True")
_args_case(
    "meta-wrong-type-dropout", "model_args", lambda m: m.update(dropout=[0.1]),
    "'dropout' has the wrong type",
)  # fmt: skip
_args_case("meta-wrong-type-ws", "model_args", lambda m: m.update(ws=1), "'ws' has the wrong type")
_args_case("meta-unknown-field", "train_args", lambda t: t.update(speed=3), "unknown field 'speed'")
_meta_case("meta-wrong-type-class-names", {"class_names": "[0, 1, 2]"}, "'class_names'")
_meta_case("meta-wrong-type-input-shape", {"input_shape": '[1, "28", 28]'}, "'input_shape'")
_meta_case("meta-wrong-input-shape", {"input_shape": "[1, 28, 8]"}, "'input_shape'")
_meta_case("meta-wrong-type-std", {"std": "[0]"}, "'std'")
_meta_case("meta-history-not-numbers", {"history": '[{"epoch": "one"}]'}, "'history'")
_meta_case("meta-history-keys-missing", {"history": '[{"epoch": 1}]'}, "'history'")
_meta_case("meta-history-nan", {"history": '[{"epoch": NaN}]'}, "'history'")
_args_case(
    "meta-unknown-dataset", "model_args", lambda m: m.update(dataset="svhn"),
    "unknown dataset 'svhn'", "mnist",
)  # fmt: skip
_args_case(
    "meta-unknown-model", "model_args", lambda m: m.update(model="vit"), "unknown model 'vit'"
)
_args_case(
    "meta-unknown-norm", "model_args", lambda m: m.update(norm="batch"), "unknown norm 'batch'"
)
_args_case(
    "meta-groups-not-dividing", "model_args", lambda m: m.update(norm="gn", groups=5),
    "does not divide",
)  # fmt: skip
_args_case("meta-dropout-out-of-range", "model_args", lambda m: m.update(dropout=2.0), "dropout")
_meta_case("newer-format-version", {"format_version": "3"}, "format 3 is newer", "upgrade")
_meta_case("zero-format-version", {"format_version": "0"}, "format 0")


@case("meta-dataset-the-model-cannot-take", "model mnist_net takes images of shape (1, 28, 28)",
      "not cifar10's (3, 32, 32)")  # fmt: skip
def _(e: Env) -> list[str | Path]:
    """Metadata consistent in itself (cifar10's classes, shape, mean and std) over mnist_net's
    tensors: refused on load, not inside the first convolution."""
    raw, _ = read_file(e.ckpt)
    model_args = {**json.loads(raw["model_args"]), "dataset": "cifar10"}
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]  # fmt: skip
    meta = {"model_args": json.dumps(model_args), "class_names": json.dumps(classes),
            "input_shape": "[3, 32, 32]", "mean": "[0.5, 0.5, 0.5]", "std": "[0.25, 0.25, 0.25]"}
    return e.eval(e.variant(meta))  # fmt: skip


def _reshape_head(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**tensors, "model.head.weight": torch.zeros(10, 17)}


def _drop_tensor(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k != "model.features.0.conv.weight"}


def _extra_tensor(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**tensors, "model.features.9.weight": torch.zeros(3)}


def _wrong_dtype(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**tensors, "model.head.bias": tensors["model.head.bias"].double()}


simple(
    "tensor-shape-mismatch",
    lambda e: e.eval(e.variant(tensors=_reshape_head)),
    "'head.weight'",
    "(10, 17)",
    "(10, 16)",
)
simple(
    "tensor-missing",
    lambda e: e.eval(e.variant(tensors=_drop_tensor)),
    "missing 'features.0.conv.weight'",
)
simple("tensor-unexpected", lambda e: e.eval(e.variant(tensors=_extra_tensor)), "unexpected")
simple("tensor-wrong-dtype", lambda e: e.eval(e.variant(tensors=_wrong_dtype)), "head.bias")
simple(
    "tensors-of-other-norm",
    lambda e: e.eval(
        e.variant(
            {
                "model_args": json.dumps(
                    {**json.loads(read_file(e.ckpt)[0]["model_args"]), "norm": "gn", "groups": 2}
                )
            }
        )
    ),
    "tensors do not match",
)

# The same loader behind every command that takes a checkpoint.
simple(
    "misclassified-ckpt-missing",
    lambda e: ["misclassified", e.tmp / "gone.safetensors", "--data-dir", e.data],
    "no such file",
)
simple(
    "plot-ckpt-directory",
    lambda e: ["plot", e.tmp / "none", "--out", e.tmp / "c.png"],
    "no such file",
)
simple(
    "plot-ckpt-bad-metadata",
    lambda e: ["plot", e.variant({"history": "{}"}), "--out", e.tmp / "c.png"],
    "'history'",
)
simple("summary-ckpt-newer", lambda e: ["summary", e.variant({"format_version": "7"})], "newer")
simple(
    "resume-ckpt-missing",
    lambda e: ["train", "--resume", e.tmp / "gone.safetensors", "--data-dir", e.data],
    "no such file",
)
simple(
    "resume-ckpt-without-resume-state",
    lambda e: [
        "train",
        "--resume",
        e.variant({"resume": None}),
        "--data-dir",
        e.data,
        "--device",
        "cpu",
    ],
    "holds no resume state",
)


def _resume_metadata_case(
    key: str, name: str, edit: Callable[[dict], None], *expected: str
) -> None:
    """`train --resume` on a checkpoint whose JSON metadata `key` was edited in place."""

    def build(e: Env) -> list[str | Path]:
        raw, _ = read_file(e.ckpt)
        value = json.loads(raw[key])
        edit(value)
        path = e.variant({key: json.dumps(value)})
        return ["train", "--resume", path, "--data-dir", e.data, "--device", "cpu"]

    simple(name, build, *expected)


def _config_case(name: str, edit: Callable[[dict], None], *expected: str) -> None:
    _resume_metadata_case("train_args", name, edit, *expected)


_config_case(
    "resume-config-wrong-type", lambda c: c.update(epochs="3"), "'epochs' has the wrong type"
)
_config_case("resume-config-missing", lambda c: c.pop("batch_size"), "'batch_size' missing")
_config_case("resume-config-invalid", lambda c: c.update(lr=-1.0), "lr must be positive")
_resume_metadata_case(
    "model_args", "resume-config-other-model", lambda m: m.update(norm="ln"),
    "tensors do not match",
)  # fmt: skip
_config_case(
    "resume-config-other-batch-size", lambda c: c.update(batch_size=7), "does not fit", "steps"
)
simple(
    "resume-with-run-option",
    lambda e: ["train", "--resume", e.ckpt, "--epochs", "3", "--data-dir", e.data],
    "drop --epochs",
)
simple(
    "resume-with-ws-flag",
    lambda e: ["train", "--resume", e.ckpt, "--no-ws", "--data-dir", e.data],
    "drop --ws/--no-ws",
)


def _resume_case(name: str, edit: Callable[[dict], None], *expected: str) -> None:
    _resume_metadata_case("resume", name, edit, *expected)


_resume_case(
    "resume-steps-tampered",
    lambda r: r.update(steps_per_epoch=3),
    "does not fit",
    "3 steps per epoch",
)
_resume_case(
    "resume-steps-missing", lambda r: r.pop("steps_per_epoch"), "'steps_per_epoch' missing"
)
_resume_case("resume-epoch-wrong", lambda r: r.update(epoch=7), "does not fit", "epoch")


@case("resume-momentum-buffer-reshaped", "does not fit", "optim.0.momentum_buffer")
def _(e: Env) -> list[str | Path]:
    path = e.variant(tensors=lambda t: {**t, "optim.0.momentum_buffer": torch.zeros(3)})
    return ["train", "--resume", path, "--data-dir", e.data, "--device", "cpu"]


@case("resume-unexpected-optimizer-tensor", "does not fit", "'optim.x'")
def _(e: Env) -> list[str | Path]:
    path = e.variant(tensors=lambda t: {**t, "optim.x": torch.zeros(1)})
    return ["train", "--resume", path, "--data-dir", e.data, "--device", "cpu"]


@case("resume-rng-state-broken", "resume state is unusable")
def _(e: Env) -> list[str | Path]:
    path = e.variant(tensors=lambda t: {**t, "rng.torch": torch.zeros(5, dtype=torch.uint8)})
    return ["train", "--resume", path, "--data-dir", e.data, "--device", "cpu"]


@case("resume-with-other-data", "does not fit", "same data and limit")
def _(e: Env) -> list[str | Path]:
    from normcli.data import write_synthetic

    # Other data: other steps per epoch.
    root = write_synthetic("mnist", e.tmp / "bigger", n_train=400)
    return ["train", "--resume", e.ckpt, "--data-dir", root, "--device", "cpu"]


# --- eval / misclassified options --------------------------------------------------------------

simple(
    "misclassified-n-zero",
    lambda e: ["misclassified", e.ckpt, "--n", "0", "--data-dir", e.data],
    "--n must be a positive",
)
simple(
    "misclassified-n-negative",
    lambda e: ["misclassified", e.ckpt, "--n", "-3", "--data-dir", e.data],
    "--n",
)
simple("eval-limit-zero", lambda e: e.eval(e.ckpt, "--limit", "0"), "--limit must be a positive")

# --- devices ----------------------------------------------------------------------------------

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
CASES.append(
    pytest.param(
        lambda e: e.train("--device", "cuda"),
        ["--device cuda", "no CUDA GPU"],
        id="train-device-cuda-without-gpu",
        marks=no_cuda,
    )
)
CASES.append(
    pytest.param(
        lambda e: e.eval(e.ckpt, "--device", "cuda"),
        ["no CUDA GPU"],
        id="eval-device-cuda-without-gpu",
        marks=no_cuda,
    )
)

# --- output paths and overwriting -----------------------------------------------------------


def _unwritable_folder(e: Env) -> Path:
    """A folder this process cannot write to (root ignores modes: then a read-only sysfs)."""
    folder = e.tmp / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    pytest.skip("no unwritable folder available to this user")


# (a missing --out folder is created, and an existing folder takes the default file name:
# tests/test_runs.py checks both)
simple(
    "train-out-under-a-file", lambda e: e.train(out=e.ckpt / "run.safetensors"), "is not a folder"
)
simple(
    "train-out-unwritable",
    lambda e: e.train(out=_unwritable_folder(e) / "run.safetensors"),
    "not writable",
)
simple("train-out-exists", lambda e: e.train(out=e.ckpt), "exists", "--overwrite")
simple(
    "plot-out-folder-missing",
    lambda e: ["plot", e.ckpt, "--out", e.tmp / "figs" / "curves.png"],
    "does not exist",
)
simple(
    "plot-out-unwritable",
    lambda e: ["plot", e.ckpt, "--out", _unwritable_folder(e) / "curves.png"],
    "not writable",
)


@case("plot-out-exists", "exists", "--overwrite")
def _(e: Env) -> list[str | Path]:
    (e.tmp / "curves.png").write_bytes(b"an older figure")
    return ["plot", e.ckpt, "--out", e.tmp / "curves.png"]


@case("plot-default-out-exists", "exists", "--overwrite")
def _(e: Env) -> list[str | Path]:
    (e.tmp / "curves.png").write_bytes(b"an older figure")  # the default: beside the checkpoint
    return ["plot", e.ckpt]


@case("misclassified-out-exists", "exists", "--overwrite")
def _(e: Env) -> list[str | Path]:
    (e.tmp / "grid.png").write_bytes(b"an older grid")
    return ["misclassified", e.ckpt, "--data-dir", e.data, "--out", e.tmp / "grid.png"]


@case("eval-confusion-exists", "exists", "--overwrite")
def _(e: Env) -> list[str | Path]:
    (e.tmp / "confusion.png").write_bytes(b"an older heatmap")
    return e.eval(e.ckpt, "--confusion", e.tmp / "confusion.png")


# ------------------------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under `roots`: kind, size, mtime and a content hash."""
    state: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                state[os.path.join(dirpath, name)] = ("dir",)
            for name in filenames:
                path = Path(dirpath, name)
                st = path.lstat()
                small = path.is_file() and st.st_size < 64 * 1024**2  # not the sparse giants
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if small else ""
                state[str(path)] = ("file", st.st_size, st.st_mtime_ns, oct(st.st_mode), digest)
    return state


@pytest.fixture
def env(tmp_path: Path, tiny_data: Path, tiny_checkpoints: dict[str, Path], monkeypatch) -> Env:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # default output paths (checkpoints/, ...) land here, in the snapshot
    ckpt = work / "good.safetensors"
    shutil.copy2(tiny_checkpoints["bn_l1"], ckpt)
    return Env(work, tiny_data, ckpt)


@pytest.mark.parametrize(("build", "expected"), CASES)
def test_bad_input_is_one_clean_line(
    build: Callable[[Env], list[str | Path]],
    expected: list[str],
    env: Env,
    tiny_checkpoints: dict[str, Path],
    cli,
) -> None:
    args = build(env)
    watched = (env.tmp, env.data, next(iter(tiny_checkpoints.values())).parent)
    before = snapshot(*watched)
    try:
        result = cli(*args, env=OFFLINE)
        after = snapshot(*watched)
    finally:
        if (env.tmp / "locked").exists():
            (env.tmp / "locked").chmod(0o755)  # let pytest clean up

    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("normcli: error: "), lines[0]
    for fragment in expected:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert "--debug" not in lines[0]  # that hint is for internal errors only
    assert result.stdout == ""
    assert after == before, "files changed: " + ", ".join(
        sorted(set(after) ^ set(before) | {k for k in after if before.get(k) != after[k]})
    )
    assert not (env.tmp / "pwned").exists()


def test_every_case_has_a_unique_id() -> None:
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids))


def test_internal_errors_are_one_line_and_a_debug_hint(monkeypatch, cli) -> None:
    import normcli.models

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(normcli.models, "get_model_info", broken)
    result = cli("summary", "--model", "mnist_net")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "normcli: error: internal error: ZeroDivisionError: boom",
        "rerun with --debug for the traceback",
    ]
    debug = cli("--debug", "summary", "--model", "mnist_net")
    assert "Traceback" in debug.stderr and "ZeroDivisionError: boom" in debug.stderr


def test_overwrite_replaces_a_checkpoint(env: Env, cli) -> None:
    """The refusals above have a way out: --overwrite replaces the file (atomically)."""
    before = env.ckpt.read_bytes()
    result = cli(*env.train("--limit", "32", "--overwrite", out=env.ckpt), env=OFFLINE)
    assert result.exit_code == 0, result.stderr
    assert env.ckpt.read_bytes() != before
    assert [p.name for p in env.tmp.iterdir()] == [env.ckpt.name]
