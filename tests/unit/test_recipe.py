"""The training recipe's options: precision (recorded, resumed), the weights' moving average
(--ema), label smoothing, and test-time augmentation as an evaluation protocol of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, train_tiny
from safetensors.torch import save_file

from normcli import evaluate as evaluation
from normcli import tuning
from normcli.checkpoint import load_checkpoint, read_file, read_metadata
from normcli.config import RunSpec
from normcli.data import get_dataset, normalize, synthetic_split
from normcli.ema import LIVE_PREFIX
from normcli.errors import NormcliError
from normcli.evaluate import evaluate, metrics
from normcli.run import new_run, save_run, start_run
from normcli.train import evaluate_run, resume_training, run_epoch, train, train_epoch
from normcli.tta import predict_tta, views

CPU = torch.device("cpu")
MNIST = get_dataset("mnist")


def small_run(n: int = 48, **options: object):
    """A seeded one-thread run on `n` synthetic MNIST images, no augmentation."""
    spec = RunSpec.from_options(
        dataset="mnist", epochs=1, batch_size=16, augment=False, threads=1, **options
    ).resolve()  # fmt: skip
    return new_run(spec, synthetic_split(MNIST, n, 3), synthetic_split(MNIST, 16, 4), CPU)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ema_weights_equal_an_independently_computed_average() -> None:
    decay = 0.8
    run = small_run(ema=decay, precision="fp32")  # 3 steps
    live = []  # every float parameter and buffer after each step
    run.optimizer.register_step_post_hook(
        lambda *_: live.append({k: v.detach().clone() for k, v in run.model.state_dict().items()})
    )
    train_epoch(run)
    assert len(live) == 3
    want = dict(live[0])  # the average starts from the weights after the first step
    for state in live[1:]:
        for k, v in state.items():
            want[k] = decay * want[k] + (1 - decay) * v if v.is_floating_point() else v
    got = run.ema.module.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(got["features.0.conv.weight"], live[-1]["features.0.conv.weight"])
    assert int(got["features.0.norm.num_batches_tracked"]) == 3


def test_ema_is_what_is_evaluated_and_saved_and_resumes_exactly(
    tiny_data: Path, tmp_path: Path
) -> None:
    spec = RunSpec.from_options(dataset="mnist", epochs=2, batch_size=32, ema=0.9, threads=1)
    whole = train(spec, data_dir=tiny_data, device="cpu", out=tmp_path / "whole.safetensors")
    run = start_run(spec, data_dir=tiny_data, device="cpu")
    run_epoch(run)
    assert run.history[0]["test_loss"] == evaluate(run.ema.module, run.test_split,
                                                   run.dataset).loss  # fmt: skip
    assert evaluate_run(run).loss != evaluate(run.model, run.test_split, run.dataset).loss
    half = save_run(run, tmp_path / "half.safetensors")
    ckpt = load_checkpoint(half)
    for k, v in run.ema.module.state_dict().items():  # the file's model is the average
        assert torch.equal(ckpt.model.state_dict()[k], v), k
        assert torch.equal(ckpt.extra[LIVE_PREFIX + k], run.model.state_dict()[k]), k
    resume_training(half, data_dir=tiny_data, device="cpu")
    _, resumed = read_file(half)
    _, reference = read_file(whole.path)
    assert resumed.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(resumed[k], v), k


def test_an_averaged_checkpoint_without_its_live_weights_does_not_resume(
    tiny_data: Path, tmp_path: Path
) -> None:
    spec = RunSpec.from_options(dataset="mnist", epochs=2, batch_size=32, ema=0.9, threads=1)
    run = start_run(spec, data_dir=tiny_data, device="cpu")
    run_epoch(run)
    path = save_run(run, tmp_path / "a.safetensors")
    raw, tensors = read_file(path)
    save_file({k: v for k, v in tensors.items() if not k.startswith(LIVE_PREFIX)}, str(path),
              metadata=raw)  # fmt: skip
    with pytest.raises(NormcliError, match="resume state does not fit this run .its live"):
        resume_training(path, data_dir=tiny_data, device="cpu")


def test_label_smoothing_loss_equals_a_hand_computed_value() -> None:
    eps = 0.1
    run = small_run(n=16, label_smoothing=eps, precision="fp32", lr=1e-6)  # one step
    torch.manual_seed(run.spec.train.seed)
    model = run.spec.model.build().train()  # the run's initial weights
    split = run.train_split
    with torch.no_grad():
        logp = model(normalize(split.images, MNIST)).log_softmax(1)
    classes = logp.shape[1]
    by_hand = -((1 - eps) * logp.gather(1, split.labels[:, None]).squeeze(1)
                + eps / classes * logp.sum(1)).mean()  # fmt: skip
    loss, _ = train_epoch(run)
    assert loss == pytest.approx(float(by_hand), rel=1e-5)
    plain = float(F.nll_loss(logp, split.labels))  # near-uniform logits: close, but apart
    assert abs(loss - plain) > 50 * 1e-5 * loss


def test_tta_logits_are_the_mean_of_the_views_logits() -> None:
    torch.manual_seed(0)
    cifar = get_dataset("cifar10")
    model = RunSpec.from_options(dataset="cifar10").resolve().model.build().eval()
    split = synthetic_split(cifar, 12, 5)
    x = normalize(split.images, cifar)
    with torch.no_grad():
        want = (model(x) + model(x.flip(-1))) / 2
    assert list(views(cifar)) == ["identity", "hflip"]
    torch.testing.assert_close(predict_tta(model, split, cifar, batch_size=5), want)

    model = RunSpec.from_options(dataset="mnist", norm="gn").resolve().model.build().eval()
    split = synthetic_split(MNIST, 12, 5)
    padded = F.pad(split.images, (1, 1, 1, 1))  # black border, in pixels
    # the image itself, then moved up, down, left, right by one pixel
    crops = [padded[..., 1:29, 1:29], padded[..., 2:30, 1:29], padded[..., 0:28, 1:29],
             padded[..., 1:29, 2:30], padded[..., 1:29, 0:28]]  # fmt: skip
    with torch.no_grad():
        want = torch.stack([model(normalize(c, MNIST)) for c in crops]).mean(0)
    assert list(views(MNIST)) == ["identity", "up", "down", "left", "right"]
    torch.testing.assert_close(predict_tta(model, split, MNIST, batch_size=5), want)


def test_eval_tta_is_reported_apart_from_the_test_accuracy(
    tiny_checkpoints: dict[str, Path], tiny_data: Path
) -> None:
    path = tiny_checkpoints["cifar"]
    plain = run_cli("eval", path, "--data-dir", tiny_data, "--device", "cpu", "--json")
    both = run_cli("eval", path, "--data-dir", tiny_data, "--device", "cpu", "--json", "--tta")
    assert plain.exit_code == both.exit_code == 0, both.stderr
    [plain_doc], [doc] = json.loads(plain.stdout), json.loads(both.stdout)
    assert "tta" not in plain_doc and doc["metrics"] == plain_doc["metrics"]
    assert doc["tta_views"] == ["identity", "hflip"]
    ckpt = load_checkpoint(path)
    test = evaluation.test_splits([ckpt], tiny_data)["cifar10"]
    want = metrics(predict_tta(ckpt.model, test, get_dataset("cifar10")), test.labels, 10)
    assert doc["tta"]["accuracy"] == pytest.approx(want.accuracy)
    assert doc["tta"]["loss"] == pytest.approx(want.loss)
    text = run_cli("eval", path, "--data-dir", tiny_data, "--device", "cpu", "--tta")
    assert "TTA (identity, hflip): test loss" in text.stdout
    grouped = run_cli("eval", path, "--group-by", "norm", "--tta")
    assert grouped.exit_code == 2 and "--tta evaluates" in grouped.stderr


def test_precision_is_recorded_resolved_and_resume_forces_it(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = RunSpec.from_options(dataset="mnist", epochs=2, batch_size=32, threads=1)
    monkeypatch.setattr(tuning, "cpu_facts", lambda: tuning.CpuFacts("x", frozenset({"amx_bf16"})))
    whole = train(spec, data_dir=tiny_data, device="cpu", out=tmp_path / "whole.safetensors")
    assert read_metadata(whole.path).train_args.precision == "bf16"  # auto, resolved
    run = start_run(spec, data_dir=tiny_data, device="cpu")
    run_epoch(run)
    half = save_run(run, tmp_path / "half.safetensors")
    # Resumed where auto would mean fp32: the recorded bf16 is what the second epoch runs in.
    monkeypatch.setattr(tuning, "cpu_facts", lambda: tuning.CpuFacts("y", frozenset()))
    fp32 = train(spec, data_dir=tiny_data, device="cpu", out=tmp_path / "fp32.safetensors")
    assert read_metadata(fp32.path).train_args.precision == "fp32"
    assert fp32.history[-1]["train_loss"] != whole.history[-1]["train_loss"]
    resume_training(half, data_dir=tiny_data, device="cpu")
    assert read_metadata(half).train_args.precision == "bf16"
    _, resumed = read_file(half)
    _, reference = read_file(whole.path)
    for k, v in reference.items():
        assert torch.equal(resumed[k], v), k


def test_precision_on_the_command_line(tiny_data: Path, tmp_path: Path) -> None:
    path = train_tiny(tiny_data, tmp_path / "a.safetensors", "--precision", "fp32",
                      "--no-channels-last", "--label-smoothing", "0.1", "--ema", "0.5")  # fmt: skip
    t = read_metadata(path).train_args
    assert (t.precision, t.channels_last, t.label_smoothing, t.ema) == ("fp32", False, 0.1, 0.5)
    bad = run_cli("train", "--data-dir", tiny_data, "--precision", "fp16")
    assert bad.exit_code == 2 and "fp16" in bad.stderr and "Traceback" not in bad.stderr
    for flag, value in (("--ema", "1"), ("--label-smoothing", "-0.1")):
        bad = run_cli("train", "--data-dir", tiny_data, flag, value, "--out", tmp_path / "b/")
        assert bad.exit_code == 2
        assert bad.stderr == f"normcli: error: {flag} must be in [0, 1), got {float(value)}\n"


def test_checkpoints_from_before_the_recipe_options_read_as_fp32_and_plain(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    raw, tensors = read_file(tiny_checkpoints["gn"])
    train_args = json.loads(raw["train_args"])
    for key in ("precision", "ema", "label_smoothing"):
        del train_args[key]
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**raw, "train_args": json.dumps(train_args)})
    t = read_metadata(old).train_args
    assert (t.precision, t.ema, t.label_smoothing) == ("fp32", 0.0, 0.0)
    train_args["precision"] = "auto"  # a file records what it trained in, never auto
    save_file(tensors, str(old), metadata={**raw, "train_args": json.dumps(train_args)})
    with pytest.raises(NormcliError, match="leaves 'precision' unset"):
        read_metadata(old)
