"""The Dockerfile, checked statically: NVIDIA base, the [gpu] extra, no plain onnxruntime, entrypoint."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(op.upper(), rest.strip()) for op, _, rest in (entry.partition(" ") for entry in logical)]


@pytest.fixture(scope="module")
def instructions():
    return _instructions((ROOT / "Dockerfile").read_text())


def _pip_installs(instructions) -> list[list[str]]:
    """Arguments of every ``pip install`` in RUN commands."""
    installs = []
    for op, args in instructions:
        if op != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token not in ("&&", "||", ";", "|"):
                command.append(token)
                continue
            if any("pip" in word for word in command) and "install" in command:
                installs.append(command[command.index("install") + 1 :])
            command = []
    return installs


def test_base_is_an_nvidia_tensorrt_or_cuda_runtime_image(instructions):
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    (base,) = [a for op, a in instructions if op == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base).split()[0]
    tensorrt = re.fullmatch(r"nvcr\.io/nvidia/tensorrt:\d+\.\d+-py3", base)
    cuda_runtime = re.fullmatch(r"(nvcr\.io/)?nvidia/cuda:[\w.-]*runtime[\w.-]*", base)
    assert tensorrt or cuda_runtime, base


def test_installs_the_gpu_extra_and_never_plain_onnxruntime(instructions):
    installs = _pip_installs(instructions)
    assert any(re.fullmatch(r"\.\[(\w+,)*gpu(,\w+)*\]", word) for words in installs for word in words), installs
    for words in installs:
        for word in words:
            assert not re.match(r"onnxruntime(?![-_]gpu)\b", word), f"plain onnxruntime in: {words}"
            assert not re.search(r"\[(\w+,)*cpu(,\w+)*\]", word), f"the cpu extra brings onnxruntime: {words}"


def test_gpu_extra_is_onnxruntime_gpu():
    # tomllib is 3.11+, the project supports 3.10: read the one-line extra directly.
    (line,) = re.findall(r"^gpu\s*=\s*\[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    names = [re.split(r"[<>=!~\[; ]", dep)[0] for dep in re.findall(r'"([^"]+)"', line)]
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names


def test_entrypoint_is_the_cli(instructions):
    (entrypoint,) = [a for op, a in instructions if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["acf-deploy"]
    copied = " ".join(a for op, a in instructions if op == "COPY")
    assert "pyproject.toml" in copied and "acf_deploy" in copied
