"""Fuzzing the checkpoint loader: damaged files load as a valid model or fail cleanly.

Real checkpoints are damaged many times over (flipped bits, overwritten spans,
truncation, inserted or deleted bytes, a forged header length) with a seeded
generator, and their metadata is replaced by arbitrary JSON with hypothesis.
Every load must either give a model that runs, or raise NormcliError with a
one-line message: never another exception, never a hang.
"""

from __future__ import annotations

import json
import random
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from normcli.checkpoint import METADATA_KEYS, load_checkpoint, read_file, read_metadata
from normcli.errors import NormcliError
from normcli.train import resume_training

CASES_PER_CHECKPOINT = 150
CLI_CASES = 12
SECONDS_PER_LOAD = 20  # generous on a busy machine; a hang is minutes, not seconds


@contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Fail instead of hanging (SIGALRM; pytest runs tests in the main thread)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"{what} took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _header_end(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


# Each mutation takes the file's bytes and a seeded generator; most aim at the header,
# where the parsing happens, the rest anywhere (tensor bytes: a valid but different model).
def flip_bits(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    end = _header_end(raw) if rng.random() < 0.7 else len(raw)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(end)] ^= 1 << rng.randrange(8)
    return bytes(data)


def overwrite_span(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    end = _header_end(raw) if rng.random() < 0.7 else len(raw)
    start = rng.randrange(end)
    length = min(rng.randint(1, 64), len(raw) - start)
    data[start : start + length] = rng.randbytes(length)
    return bytes(data)


def replace_json_char(raw: bytes, rng: random.Random) -> bytes:
    """Swap one header byte for JSON punctuation or a digit: damage the parser sees as JSON."""
    data = bytearray(raw)
    data[rng.randrange(8, _header_end(raw))] = ord(rng.choice('{}[]",:0123456789.-etn '))
    return bytes(data)


def edit_metadata_text(raw: bytes, rng: random.Random) -> bytes:
    """Damage one normcli metadata value but keep the safetensors header valid JSON."""
    end = _header_end(raw)
    header = json.loads(raw[8:end])
    meta = header["__metadata__"]
    key = rng.choice(sorted(meta))
    text = meta[key]
    at = rng.randrange(len(text) + 1)
    if rng.random() < 0.5:
        text = text[:at] + rng.choice('{}[]",:0123456789.-etn ') + text[at + 1 :]
    else:
        text = text[:at] + text[at + rng.randint(1, 8) :]
    header["__metadata__"] = {**meta, key: text}
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + raw[end:]


def truncate(raw: bytes, rng: random.Random) -> bytes:
    return raw[: rng.randrange(len(raw))]


def insert_bytes(raw: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(raw))
    return raw[:at] + rng.randbytes(rng.randint(1, 16)) + raw[at:]


def delete_bytes(raw: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(raw))
    return raw[:at] + raw[at + rng.randint(1, 16) :]


def forge_header_length(raw: bytes, rng: random.Random) -> bytes:
    length = rng.choice([0, 1, 2**63, 2**40, _header_end(raw) - 8 + rng.randint(-50, 50)])
    return struct.pack("<Q", max(length, 0)) + raw[8:]


MUTATIONS: list[Callable[[bytes, random.Random], bytes]] = [
    flip_bits, flip_bits, overwrite_span, replace_json_char, edit_metadata_text,
    edit_metadata_text, edit_metadata_text, truncate, insert_bytes, delete_bytes,
    forge_header_length,
]  # fmt: skip


def check_load(path: Path) -> str:
    """Load `path`; 'ok' for a working model, 'refused' for a clean error; anything else fails."""
    try:
        with deadline(SECONDS_PER_LOAD, f"loading {path.name}"):
            ckpt = load_checkpoint(path)
            read_metadata(path)
    except NormcliError as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
        assert e.exit_code == 2
        return "refused"
    shape = ckpt.meta.input_shape
    with torch.no_grad():
        logits = ckpt.model(torch.zeros(2, *shape))
    assert logits.shape == (2, len(ckpt.meta.class_names))
    return "ok"


@pytest.mark.parametrize("name", ["bn_l1", "gn", "cifar"])
def test_damaged_checkpoints_load_or_fail_cleanly(
    name: str, tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    raw = tiny_checkpoints[name].read_bytes()
    rng = random.Random(f"normcli-fuzz-{name}")
    outcomes = {"ok": 0, "refused": 0}
    for i in range(CASES_PER_CHECKPOINT):
        mutate = rng.choice(MUTATIONS)
        damaged = mutate(raw, rng)
        path = tmp_path / f"{i:03d}_{mutate.__name__}.safetensors"
        path.write_bytes(damaged)
        try:
            outcomes[check_load(path)] += 1
        except Exception as e:  # report the case, keep the file for a look
            raise AssertionError(f"case {i} ({mutate.__name__}): {type(e).__name__}: {e}") from e
        path.unlink()
    # Both outcomes happen: the fuzzing reaches the parser and the tensors alike.
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0, outcomes


def test_damaged_checkpoints_resume_or_fail_cleanly(
    tiny_checkpoints: dict[str, Path], tiny_data: Path, tmp_path: Path
) -> None:
    """`train --resume` reads more of the file (optimizer, scheduler, RNG): fuzz that path too."""
    raw = tiny_checkpoints["bn_l1"].read_bytes()
    rng = random.Random("normcli-fuzz-resume")
    for i in range(60):
        mutate = rng.choice([flip_bits, overwrite_span, edit_metadata_text, edit_metadata_text])
        path = tmp_path / f"{i:03d}.safetensors"
        path.write_bytes(mutate(raw, rng))
        before = path.read_bytes()
        try:
            with deadline(SECONDS_PER_LOAD, f"resuming {path.name}"):
                resume_training(path, data_dir=tiny_data, device="cpu")
        except NormcliError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
        except Exception as e:
            raise AssertionError(f"case {i} ({mutate.__name__}): {type(e).__name__}: {e}") from e
        # The run was complete: resuming has nothing to train and must not rewrite the file.
        assert path.read_bytes() == before


def test_damaged_checkpoints_through_the_cli(
    tiny_checkpoints: dict[str, Path], tiny_data: Path, tmp_path: Path, cli
) -> None:
    """The same damage through `normcli eval`: exit 0 or one clean line with exit 2."""
    raw = tiny_checkpoints["ln"].read_bytes()
    rng = random.Random("normcli-fuzz-cli")
    for i in range(CLI_CASES):
        mutate = MUTATIONS[i % len(MUTATIONS)]
        path = tmp_path / f"{i:03d}.safetensors"
        path.write_bytes(mutate(raw, rng))
        result = cli("eval", path, "--data-dir", tiny_data, "--device", "cpu", "--json")
        assert result.exit_code in (0, 2), (mutate.__name__, result.stderr)
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr
        if result.exit_code == 2:
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        else:
            assert json.loads(result.stdout)[0]["path"] == str(path)


# Arbitrary JSON (and non-JSON) in place of one metadata entry: the schema must hold.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
metadata_text = json_values.map(json.dumps) | st.text(max_size=20)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(key=st.sampled_from(sorted(METADATA_KEYS)), text=metadata_text)
def test_arbitrary_metadata_values_load_or_fail_cleanly(
    key: str, text: str, tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    meta, tensors = read_file(tiny_checkpoints["gn"])
    path = tmp_path / "meta.safetensors"
    save_file(tensors, str(path), metadata={**(meta or {}), key: text})
    check_load(path)
