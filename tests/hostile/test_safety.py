"""Safe loading: no pickle, torch.load or eval on data from files anywhere in the package.

The one allowed exception is the reader of the official CIFAR-10 python batches,
through a restricted unpickler: normcli/data/formats.py, `unpickle_cifar_batch` and its
`_CifarBatchUnpickler` (plus the `import pickle` they need). The scan reads code
tokens, not comments or docstrings, and names the function each hit is in.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import tokenize
from pathlib import Path

import pytest
import torch

import normcli
from normcli.data import read_cifar_py, unpickle_cifar_batch
from normcli.errors import NormcliError

PACKAGE = Path(normcli.__file__).resolve().parent

# (file, top-level definition) pairs allowed to touch pickle; "<module>" is the import line.
READER = Path("data", "formats.py")  # the module of the CIFAR python batch reader
ALLOWED = {
    (READER, "<module>"),  # import pickle
    (READER, "_CifarBatchUnpickler"),
    (READER, "unpickle_cifar_batch"),
}
# Modules that deserialize arbitrary objects, and builtins that run code from text.
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "shelve",
    "marshal",
    "joblib",
}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
# attribute chains that unpickle under the hood
UNSAFE_CALLS = {("torch", "load"), ("jit", "load"), ("np", "load"), ("numpy", "load")}
UNSAFE_KEYWORDS = {"allow_pickle", "weights_only"}  # both only matter for pickle-based loaders


def _enclosing(tree: ast.Module, line: int) -> str:
    """The name of the top-level def/class holding `line`, or '<module>'."""
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in tree.body:
        if isinstance(node, definitions) and node.lineno <= line <= (node.end_lineno or 0):
            return node.name
    return "<module>"


def unsafe_uses(source: str) -> list[tuple[int, str, str]]:
    """(line, token, enclosing definition) for every unsafe name in the code of `source`."""
    tree = ast.parse(source)
    tokens = [
        t
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type in (tokenize.NAME, tokenize.OP)
    ]
    hits = []
    for i, tok in enumerate(tokens):
        previous = tokens[i - 1].string if i else ""
        before_previous = tokens[i - 2].string if i > 1 else ""
        name = tok.string
        if tok.type != tokenize.NAME:
            continue
        unsafe = (
            name in UNSAFE_MODULES
            or (name in UNSAFE_BUILTINS and previous != ".")  # model.eval() is not eval()
            or (previous == "." and (before_previous, name) in UNSAFE_CALLS)
            or name in UNSAFE_KEYWORDS
        )
        if unsafe:
            line = tok.start[0]
            hits.append((line, name, _enclosing(tree, line)))
    return hits


def package_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 8, files  # the scan sees the whole package
    return files


def test_no_unsafe_deserialization_outside_the_cifar_reader() -> None:
    offenders = []
    for path in package_files():
        for line, name, where in unsafe_uses(path.read_text()):
            if (path.relative_to(PACKAGE), where) not in ALLOWED or name not in UNSAFE_MODULES:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} in {where}")
    assert offenders == [], "unsafe deserialization:\n" + "\n".join(offenders)


def test_the_allowed_exception_is_where_it_says() -> None:
    """The allowed names exist and are the ones that unpickle: the exception is not stale."""
    source = (PACKAGE / READER).read_text()
    hits = unsafe_uses(source)
    assert {where for _, _, where in hits} == {"<module>", "_CifarBatchUnpickler"}
    assert "_CifarBatchUnpickler(" in ast.get_source_segment(
        source,
        next(
            n
            for n in ast.parse(source).body
            if isinstance(n, ast.FunctionDef) and n.name == "unpickle_cifar_batch"
        ),
    )


@pytest.mark.parametrize(
    ("snippet", "name"),
    [
        ("import pickle\n", "pickle"),
        ("from pickle import loads\n", "pickle"),
        ("import dill as d\n", "dill"),
        ("def f(p):\n    return torch.load(p)\n", "load"),
        ("def f(p):\n    return torch.load(p, weights_only=False)\n", "weights_only"),
        ("x = np.load('a.npy', allow_pickle=True)\n", "load"),
        ("def f(s):\n    return eval(s)\n", "eval"),
        ("exec(open('x').read())\n", "exec"),
        ("m = __import__('os')\n", "__import__"),
        ("model = torch.jit.load('x.pt')\n", "load"),
    ],
)
def test_the_scan_finds_planted_uses(snippet: str, name: str) -> None:
    assert name in [n for _, n, _ in unsafe_uses(snippet)]


@pytest.mark.parametrize(
    "snippet",
    [
        "model.eval()\n",
        '"""Loads without pickle; never torch.load or eval."""\n',
        "# no pickle here\nx = 1\n",
        "data = json.loads(text)\n",
        "f = safe_open(path)\n",
        "pattern = re.compile('x')\n",
    ],
)
def test_the_scan_ignores_safe_code_and_prose(snippet: str) -> None:
    assert unsafe_uses(snippet) == []


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.mkdir, (str(self.marker),))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}))
    with pytest.raises(NormcliError, match="forbidden global"):
        unpickle_cifar_batch(path)
    assert not marker.exists()


def test_restricted_unpickler_reads_a_real_batch(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (3, 3072), dtype=torch.uint8)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": images.numpy(), b"labels": [3, 1, 4]}, protocol=4))
    split = read_cifar_py(path)
    assert torch.equal(split.images.reshape(3, -1), images)
    assert split.labels.tolist() == [3, 1, 4]
