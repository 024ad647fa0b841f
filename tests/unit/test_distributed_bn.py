"""Synchronized BatchNorm on the CPU: in one process, and in a 2-rank gloo group.

The 2-rank cases run once, in one spawn of two processes (starting them dominates the cost),
and write what they saw to files; the tests compare that with single-process nn.BatchNorm2d
on the concatenated batch, computed here.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from normcli.parallel import (
    CpuSyncBatchNorm,
    SyncBatchNormFunction,
    average_running_stats,
    convert_sync_batchnorm,
    is_distributed,
)

WORLD = 2
C, H, W = 3, 4, 5
SPLITS = ((3, 5), (4, 4), (0, 3))  # images on rank 0, rank 1: uneven, even, one rank empty
STEPS = 3
CONFIGS: dict[str, dict[str, Any]] = {
    "ema": {"momentum": 0.1},
    "cumulative": {"momentum": None},  # the average over num_batches_tracked
    "plain": {"momentum": 0.1, "affine": False, "track_running_stats": False},
}
# (split, config, dtype) triples the ranks train; float32 once, to exercise the casts.
CASES = [(s, c, torch.float64) for s in SPLITS for c in CONFIGS] + [((3, 5), "ema", torch.float32)]
TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}


def case_key(split: tuple[int, int], config: str, dtype: torch.dtype) -> str:
    """The name a case's results are saved under."""
    return f"{split[0]}+{split[1]}-{config}-{str(dtype).removeprefix('torch.')}"


def rank_slice(split: tuple[int, ...], rank: int) -> slice:
    """Rank's images within the concatenated batch."""
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def full_batch(
    split: tuple[int, ...], step: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch of a step and the gradient of the loss with respect to the
    output (the loss being sum(output * grad)); the same on every rank and here."""
    g = torch.Generator().manual_seed(1000 * split[0] + 100 * split[1] + step)
    # Off-centre and wider than unit variance, so that mean and variance matter.
    x = torch.randn(sum(split), C, H, W, generator=g, dtype=torch.float64) * 2 + 3
    grad = torch.randn(sum(split), C, H, W, generator=g, dtype=torch.float64)
    return x.to(dtype), grad.to(dtype)


def make_bn(cls: type[nn.BatchNorm2d], config: str, dtype: torch.dtype) -> nn.BatchNorm2d:
    """A BatchNorm2d (or subclass) with non-trivial affine parameters."""
    bn = cls(C, **CONFIGS[config]).to(dtype)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
            bn.bias.copy_(torch.tensor([0.1, -0.3, 2.0]))
    return bn


# ---- what each rank runs -------------------------------------------------------------------


def rank_training(rank: int) -> dict[str, Any]:
    """Every case: a few steps of forward and backward of rank's part of each batch."""
    results = {}
    for split, config, dtype in CASES:
        bn = make_bn(CpuSyncBatchNorm, config, dtype)
        part = rank_slice(split, rank)
        steps = []
        for step in range(STEPS):
            x, grad = full_batch(split, step, dtype)
            x_part = x[part].clone().requires_grad_()
            y = bn(x_part)
            # This rank's loss L_r; the ranks' losses together are the full batch's loss.
            (y * grad[part]).sum().backward()
            seen = {"y": y.detach(), "grad_x": x_part.grad}
            if bn.affine:
                local = torch.stack([bn.weight.grad, bn.bias.grad])
                # What DDP does to every parameter gradient: sum over ranks, divide by world.
                ddp = local.clone()
                dist.all_reduce(ddp)
                seen.update(local=local, ddp=ddp / WORLD)
                bn.zero_grad()
            steps.append(seen)
        results[case_key(split, config, dtype)] = {"steps": steps, "state": bn.state_dict()}
    return results


class _Take(torch.autograd.Function):
    """Rank's slice of a tensor every rank holds; backward assembles the full gradient from
    every rank's slice."""

    @staticmethod
    def forward(ctx: Any, full: torch.Tensor, part: slice) -> torch.Tensor:  # type: ignore[override]
        ctx.shape, ctx.part = full.shape, part
        return full[part].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        full = grad.new_zeros(ctx.shape)
        full[ctx.part] = grad
        dist.all_reduce(full)
        return full, None


class _Assemble(torch.autograd.Function):
    """The full tensor from every rank's slice; backward keeps rank's slice of the gradient,
    which every rank holds whole."""

    @staticmethod
    def forward(ctx: Any, part_value: torch.Tensor, part: slice, n: int) -> torch.Tensor:  # type: ignore[override]
        ctx.part = part
        full = part_value.new_zeros(n, *part_value.shape[1:])
        full[part] = part_value
        dist.all_reduce(full)
        return full

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return grad[ctx.part].clone(), None, None


class _SumOverRanks(torch.autograd.Function):
    """Identity; backward sums the gradient over ranks, as DDP does before dividing."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return t.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def rank_gradcheck(rank: int) -> dict[str, bool]:
    """gradcheck of SyncBatchNormFunction inside the group.

    gradcheck perturbs its inputs on every rank at once, so each rank checks the same global
    function, (full batch, weight, bias) -> full output: every rank holds the whole batch,
    normalizes its slice, and the outputs are assembled. The sums of rank gradients in the
    backward of that plumbing are exactly the convention under test: the ranks' grad_input
    slices and summed grad_weight must make the whole batch's gradient.
    """
    split = (1, 2)
    part = rank_slice(split, rank)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(split), 2, 1, 2, generator=g, dtype=torch.float64) * 1.5 + 0.7
    weight = torch.tensor([0.8, -1.3], dtype=torch.float64)
    bias = torch.tensor([0.2, 0.5], dtype=torch.float64)

    def whole(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
        w = None if w is None else _SumOverRanks.apply(w)
        b = None if b is None else _SumOverRanks.apply(b)
        y, _, _ = SyncBatchNormFunction.apply(_Take.apply(x, part), w, b, 1e-5, None)
        return _Assemble.apply(y, part, x.shape[0])

    inputs = [t.requires_grad_() for t in (x, weight, bias)]
    # A mismatch is reported, not raised: every rank finds the same one at the same point,
    # and the other cases still run.
    return {
        "affine": torch.autograd.gradcheck(whole, inputs, raise_exception=False),
        "plain": torch.autograd.gradcheck(
            lambda x: whole(x, None, None), inputs[:1], raise_exception=False
        ),
    }


def rank_eval(rank: int) -> dict[str, bool]:
    """Eval mode inside the group is local nn.BatchNorm2d, with each rank's own statistics."""
    results = {}
    for config in ("ema", "plain"):
        sync = make_bn(CpuSyncBatchNorm, config, torch.float64)
        if sync.track_running_stats:
            sync.running_mean.fill_(rank + 0.5)
            sync.running_var.fill_(rank + 2.0)
        plain = make_bn(nn.BatchNorm2d, config, torch.float64)
        plain.load_state_dict(sync.state_dict())
        sync.eval()
        plain.eval()
        x = torch.randn(2 + rank, C, H, W, dtype=torch.float64)
        results[config] = torch.equal(sync(x), plain(x))
    return results


def rank_refusal(rank: int) -> dict[str, str]:
    """One value per channel over all ranks: every rank refuses, and none hangs."""
    bn = CpuSyncBatchNorm(C)
    try:
        bn(torch.randn(1 - rank, C, 1, 1))
    except ValueError as error:
        return {"error": str(error)}
    return {"error": ""}


def stats_model(rank: int) -> nn.Sequential:
    """BatchNorms of several kinds with running statistics that differ by rank."""
    model = nn.Sequential(
        nn.BatchNorm2d(3),
        nn.Sequential(CpuSyncBatchNorm(2), nn.Conv2d(2, 2, 1)),
        nn.BatchNorm1d(4).to(torch.float64),
        nn.BatchNorm2d(2, track_running_stats=False),
    )
    with torch.no_grad():
        for i, module in enumerate(model.modules()):
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                n = module.num_features
                module.running_mean.copy_(torch.arange(n) * (rank + 1) + i)
                module.running_var.copy_(torch.linspace(0.5, 2.0, n) * (3 * rank + 1))
                module.num_batches_tracked.fill_(10 + rank)
    return model


def rank_average(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    """average_running_stats on ranks whose statistics differ."""
    model = stats_model(rank)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    average_running_stats(model)
    return {"before": before, "after": model.state_dict()}


RANK_CASES: dict[str, Callable[[int], Any]] = {
    "training": rank_training,
    "gradcheck": rank_gradcheck,
    "eval": rank_eval,
    "refusal": rank_refusal,
    "average": rank_average,
}


def worker(rank: int, init_method: str, folder: str) -> None:
    """One rank: join the group, run every case, save what it saw."""
    torch.set_num_threads(1)  # two ranks on a small shared machine
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        results = {name: run(rank) for name, run in RANK_CASES.items()}
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(folder: Path, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Run `worker` on WORLD processes; their results, or a failure with a child's error."""
    context = mp.start_processes(
        worker,
        args=(f"file://{folder / 'rendezvous'}", str(folder)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    # join raises as soon as one child fails (and stops the others), with its traceback:
    # a failing rank fails the test instead of leaving its partner blocked in a collective.
    while not context.join(timeout=0.5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish in {timeout:g} s")
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What every rank of the 2-process group saw."""
    return run_ranks(tmp_path_factory.mktemp("ranks"))


# ---- the 2-rank tests ----------------------------------------------------------------------


def reference(
    split: tuple[int, int], config: str, dtype: torch.dtype
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Single-process nn.BatchNorm2d on the concatenated batches: per step the output, the
    input gradient and the parameter gradients of the sum of the ranks' losses; final state."""
    bn = make_bn(nn.BatchNorm2d, config, dtype)
    steps = []
    for step in range(STEPS):
        x, grad = full_batch(split, step, dtype)
        x = x.requires_grad_()
        y = bn(x)
        (y * grad).sum().backward()
        seen = {"y": y.detach(), "grad_x": x.grad}
        if bn.affine:
            seen["params"] = torch.stack([bn.weight.grad, bn.bias.grad])
            bn.zero_grad()
        steps.append(seen)
    return steps, bn.state_dict()


@pytest.mark.parametrize(("split", "config", "dtype"), CASES, ids=[case_key(*c) for c in CASES])
def test_forward_and_gradients_match_the_concatenated_batch(
    ranks: list[dict[str, Any]], split: tuple[int, int], config: str, dtype: torch.dtype
) -> None:
    expected, _ = reference(split, config, dtype)
    tol = TOLERANCE[dtype]
    for step, want in enumerate(expected):
        seen = [r["training"][case_key(split, config, dtype)]["steps"][step] for r in ranks]
        for rank, got in enumerate(seen):
            part = rank_slice(split, rank)
            torch.testing.assert_close(got["y"], want["y"][part], **tol)
            # grad_input: the gradient of the sum of all ranks' losses, through the shared
            # statistics, not of this rank's loss alone.
            torch.testing.assert_close(got["grad_x"], want["grad_x"][part], **tol)
        if "params" in want:
            # Local weight/bias gradients sum to the full batch's; after DDP's average every
            # rank holds the gradient of the mean of the ranks' losses.
            torch.testing.assert_close(sum(got["local"] for got in seen), want["params"], **tol)
            for got in seen:
                torch.testing.assert_close(got["ddp"], want["params"] / WORLD, **tol)


@pytest.mark.parametrize(("split", "config", "dtype"), CASES, ids=[case_key(*c) for c in CASES])
def test_running_statistics_match_the_concatenated_batch(
    ranks: list[dict[str, Any]], split: tuple[int, int], config: str, dtype: torch.dtype
) -> None:
    _, expected = reference(split, config, dtype)
    for r in ranks:
        state = r["training"][case_key(split, config, dtype)]["state"]
        assert state.keys() == expected.keys()
        for key, want in expected.items():
            torch.testing.assert_close(state[key], want, **TOLERANCE[dtype])


def test_gradcheck_inside_the_group(ranks: list[dict[str, Any]]) -> None:
    assert [r["gradcheck"] for r in ranks] == [{"affine": True, "plain": True}] * WORLD


def test_eval_mode_in_the_group_is_local_batchnorm(ranks: list[dict[str, Any]]) -> None:
    assert [r["eval"] for r in ranks] == [{"ema": True, "plain": True}] * WORLD


def test_a_single_value_per_channel_is_refused_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for r in ranks:
        assert "more than 1 value per channel" in r["refusal"]["error"]


def test_average_running_stats_averages_the_ranks(ranks: list[dict[str, Any]]) -> None:
    befores = [r["average"]["before"] for r in ranks]
    for r in ranks:
        after = r["average"]["after"]
        for key, before in befores[0].items():
            if key.endswith(("running_mean", "running_var")):
                want = (before + befores[1][key]) / 2
                assert not torch.equal(before, befores[1][key])  # the case is not trivial
                torch.testing.assert_close(after[key], want, rtol=0, atol=1e-6)
                assert after[key].dtype == before.dtype
            else:  # parameters and num_batches_tracked are not averaged
                assert torch.equal(after[key], before if r is ranks[0] else befores[1][key])


# ---- one process ---------------------------------------------------------------------------


def test_no_process_group_here() -> None:
    # The single-process tests below rely on it; the spawned ranks never touch this process.
    assert not dist.is_initialized() and not is_distributed()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_single_process_is_batchnorm2d(config: str) -> None:
    sync, plain = (
        make_bn(CpuSyncBatchNorm, config, torch.float32),
        make_bn(nn.BatchNorm2d, config, torch.float32),
    )
    for step in range(STEPS + 1):
        if step == STEPS:  # the last step in eval mode
            sync.eval()
            plain.eval()
        x, grad = full_batch((2, 3), step, torch.float32)
        outputs = []
        for bn in (sync, plain):
            xi = x.clone().requires_grad_()
            y = bn(xi)
            (y * grad).sum().backward()
            outputs.append((y, xi.grad, [p.grad for p in bn.parameters()]))
        (y1, gx1, gp1), (y2, gx2, gp2) = outputs
        assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
        assert all(torch.equal(a, b) for a, b in zip(gp1, gp2, strict=True))
    for (k1, v1), (k2, v2) in zip(
        sync.state_dict().items(), plain.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_state_dict_is_batchnorm2d(config: str) -> None:
    sync = make_bn(CpuSyncBatchNorm, config, torch.float32)
    plain = nn.BatchNorm2d(C, **CONFIGS[config])
    assert list(sync.state_dict()) == list(plain.state_dict())
    # Checkpoints go both ways.
    plain.load_state_dict(sync.state_dict())
    sync.load_state_dict(plain.state_dict())


class _OwnBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass: not nn.BatchNorm2d itself, so conversion leaves it alone."""


def test_convert_swaps_exactly_the_batchnorm2d_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=None, affine=False)),
        _OwnBatchNorm(4),
        nn.Flatten(),
        nn.BatchNorm1d(4 * 4 * 4),
    )
    model(torch.randn(4, 3, 6, 6))  # running statistics away from their initial values
    model[1].bias.requires_grad_(False)
    model[3].eval()
    before = {name: type(m) for name, m in model.named_modules()}
    tensors = dict(model.state_dict(keep_vars=True))
    values = {k: v.detach().clone() for k, v in tensors.items()}
    x = torch.randn(2, 3, 6, 6)
    model.eval()
    want = model(x)
    model.train()
    model[3].eval()

    converted = convert_sync_batchnorm(model, torch.device("cpu"))

    assert converted is model
    after = {name: type(m) for name, m in model.named_modules()}
    assert after.keys() == before.keys()
    swapped = {name for name in after if after[name] is not before[name]}
    assert swapped == {"1", "3.1"}
    assert all(after[name] is CpuSyncBatchNorm for name in swapped)
    # The same tensors, so the same values and requires_grad; and the same settings.
    for key, tensor in model.state_dict(keep_vars=True).items():
        assert tensor is tensors[key] and torch.equal(tensor, values[key])
    assert model[1].bias.requires_grad is False and model[1].weight.requires_grad is True
    assert model[3][1].momentum is None and not model[3][1].affine and not model[3][1].training
    assert model[1].training and model[1].eps == 1e-5
    model.eval()
    assert torch.equal(model(x), want)


def test_convert_replaces_a_root_batchnorm2d_and_dispatches_cuda_to_torch() -> None:
    bn = nn.BatchNorm2d(4)
    sync = convert_sync_batchnorm(bn, "cpu")
    assert type(sync) is CpuSyncBatchNorm and sync.weight is bn.weight
    # The CUDA branch is torch's converter; it only builds modules, so it runs without a GPU.
    model = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm1d(4)), "cuda")
    assert all(type(m) is nn.SyncBatchNorm for m in model)
    with pytest.raises(ValueError, match="cpu or cuda"):
        convert_sync_batchnorm(nn.BatchNorm2d(4), torch.device("meta"))


def test_average_running_stats_without_a_group_changes_nothing() -> None:
    model = stats_model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    average_running_stats(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
