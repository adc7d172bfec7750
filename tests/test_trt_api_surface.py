"""Every TensorRT name our code uses exists in NVIDIA's real API, 10.x and 11.x.

The fake in ``fake_tensorrt.py`` could share its author's mistakes, so this test reads our three
TensorRT modules with ``ast``, infers which expressions are TensorRT objects (the lazily imported
module is always called ``trt``; parameters and attributes are annotated ``tensorrt.X``; return
types come from the stubs) and checks each attribute it reads:

* against ``tensorrt-stubs`` 10.x, per class (``ICudaEngine.get_tensor_profile_shape``, not just
  a method of that name somewhere);
* against the identifiers in NVIDIA's ``tensorrt-cu13-bindings`` 11.x ``tensorrt.so``.

Wheels are fetched once by ``scripts/trt_api_surface.py`` into ``$ACF_TRT_API_CACHE`` (default
``~/.cache/acf-deploy/trt-api``); without PyPI the test skips and says so.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import fake_tensorrt

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["acf_deploy/trt_util.py", "acf_deploy/exporters/tensorrt.py", "acf_deploy/runtime/trt_backend.py"]
MODULE = "M"  # the type of the name ``trt``; other types: "C:X" class X, "I:X" instance, "F:X.m" method, "U" unknown


def _load_script():
    spec = importlib.util.spec_from_file_location("trt_api_surface", ROOT / "scripts" / "trt_api_surface.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


surface_script = _load_script()


@dataclass(frozen=True)
class Use:
    """One TensorRT attribute read: ``owner`` is "" for the module, a class name, or None if unknown."""

    owner: str | None
    name: str
    where: str


class _Collector:
    """Type inference just deep enough to follow TensorRT objects through our three modules."""

    def __init__(self, stubs, filename: str):
        self.stubs = stubs
        self.filename = filename
        self.uses: set[Use] = set()
        self.recording = True
        self.functions: dict[str, str] = {}  # module-level function -> annotated TensorRT return type

    def run(self, tree: ast.Module) -> set[Use]:
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                self.functions[node.name] = self._annotated(node.returns) or ""
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    self.typeof(base, {})
                self._class(node)
            elif isinstance(node, ast.FunctionDef):
                self._function(node, {})
        return self.uses

    def _class(self, node: ast.ClassDef) -> None:
        fields: dict[str, str] = {}
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                fields[f"self.{item.target.id}"] = self._annotated(item.annotation)
        methods = [item for item in node.body if isinstance(item, ast.FunctionDef)]
        for _ in range(2):  # attributes set in one method are read in others
            for method in methods:
                env = self._function(method, dict(fields), record=False)
                fields.update({k: v for k, v in env.items() if k.startswith("self.") and v})
        for method in methods:
            self._function(method, dict(fields))

    def _function(self, node: ast.FunctionDef, env: dict[str, str], record: bool = True) -> dict[str, str]:
        for arg in [*node.args.args, *node.args.kwonlyargs]:
            if arg.annotation is not None and self._annotated(arg.annotation):
                env[arg.arg] = self._annotated(arg.annotation)
        self.recording = record
        for _ in range(2):  # ast.walk is not source order: a second pass sees types assigned later
            for stmt in ast.walk(node):
                if isinstance(stmt, ast.Assign | ast.AnnAssign) and stmt.value is not None:
                    value = self.typeof(stmt.value, env)
                    if isinstance(stmt, ast.AnnAssign) and self._annotated(stmt.annotation):
                        value = self._annotated(stmt.annotation)
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                    for target in targets:
                        key = self._key(target)
                        if key and value:
                            env[key] = value
        if record:
            for expr in ast.walk(node):
                if isinstance(expr, ast.expr):
                    self.typeof(expr, env)
        self.recording = True
        return env

    @staticmethod
    def _key(target: ast.expr) -> str | None:
        if isinstance(target, ast.Name):
            return target.id
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            return f"self.{target.attr}"
        return None

    def _annotated(self, annotation: ast.expr | None) -> str:
        """``tensorrt.X`` (or ``"tensorrt.X"``) as an instance type; anything else is not TensorRT."""
        if annotation is None:
            return ""
        text = ast.unparse(annotation).strip("'\"")
        return f"I:{text[len('tensorrt.') :]}" if text.startswith("tensorrt.") else ""

    def _from_stub(self, annotation: str) -> str:
        if annotation in ("", "..."):
            return "U"
        match = re.fullmatch(r"list\[(\w+)\]", annotation)
        if match and match.group(1) in self.stubs.classes:
            return f"I:list[{match.group(1)}]"
        return f"I:{annotation}" if annotation in self.stubs.classes else ""

    def _use(self, owner: str | None, name: str, node: ast.AST) -> None:
        if self.recording:
            self.uses.add(Use(owner, name, f"{self.filename}:{node.lineno}"))

    def typeof(self, node: ast.expr, env: dict[str, str]) -> str:
        if isinstance(node, ast.Name):
            return MODULE if node.id == "trt" else env.get(node.id, "")
        if isinstance(node, ast.Attribute):
            key = self._key(node)
            if key and key.startswith("self.") and key in env:
                return env[key]
            base = self.typeof(node.value, env)
            return self._attribute(base, node) if base else ""
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in self.functions:
                return self.functions[func.id]
            kind = self.typeof(func, env)
            if kind.startswith("C:"):
                return f"I:{kind[2:]}"
            if kind.startswith("F:"):
                cls, method = kind[2:].rsplit(".", 1)
                return self._from_stub(self.stubs.member(cls, method)[1])
            return "U" if kind == "U" else ""
        if isinstance(node, ast.Subscript):
            base = self.typeof(node.value, env)
            match = re.fullmatch(r"I:list\[(\w+)\]", base)
            return f"I:{match.group(1)}" if match else ("U" if base == "U" else "")
        return ""

    def _attribute(self, base: str, node: ast.Attribute) -> str:
        name = node.attr
        if base == MODULE:
            self._use("", name, node)
            return f"C:{name}" if name in self.stubs.classes else ""
        if base == "U":
            self._use(None, name, node)
            return "U"
        cls = base[2:]
        self._use(cls, name, node)
        member = self.stubs.member(cls, name)
        if member is None:
            return "U"
        kind, annotation = member
        if kind == "class":
            return f"C:{annotation}"
        if kind == "method":
            return f"F:{cls}.{name}"
        return self._from_stub(annotation)


def collect_uses(source: str, filename: str, stubs) -> set[Use]:
    return _Collector(stubs, filename).run(ast.parse(source))


def missing_in_stubs(uses: set[Use], stubs) -> list[str]:
    missing = []
    for use in sorted(uses, key=lambda u: (u.where, u.name)):
        if use.owner == "":
            found = use.name in stubs.module
        elif use.owner is None:
            found = stubs.any_member(use.name)
        else:
            found = use.owner in stubs.classes and stubs.member(use.owner, use.name) is not None
        if not found:
            missing.append(f"{use.where}: {use.owner or 'trt'}.{use.name}")
    return missing


def missing_in_binary(uses: set[Use], binary) -> list[str]:
    missing = []
    for use in sorted(uses, key=lambda u: (u.where, u.name)):
        names = [use.name] + ([use.owner.split(".")[-1]] if use.owner else [])
        missing += [f"{use.where}: {n}" for n in names if binary.lookup(n) is None]
    return missing


@pytest.fixture(scope="module")
def surfaces():
    try:
        dirs = surface_script.fetch(surface_script.default_cache())
    except surface_script.Unreachable as exc:
        pytest.skip(f"cannot fetch NVIDIA's TensorRT API surface from PyPI: {exc}")
    return surface_script.stub_surface(dirs["stubs"]), surface_script.binary_surface(dirs["bindings"])


@pytest.fixture(scope="module")
def our_uses(surfaces):
    stubs, _ = surfaces
    uses: set[Use] = set()
    for path in SOURCES:
        uses |= collect_uses((ROOT / path).read_text(), path, stubs)
    return uses


def test_collector_sees_the_calls_that_matter(our_uses):
    seen = {(u.owner, u.name) for u in our_uses}
    assert seen >= {
        ("", "Builder"),
        ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"),
        ("Builder", "create_network"),
        ("OnnxParser", "parse_from_file"),
        ("IBuilderConfig", "set_memory_pool_limit"),
        ("IBuilderConfig", "create_timing_cache"),
        ("IOptimizationProfile", "set_shape"),
        ("Builder", "build_serialized_network"),
        ("ITimingCache", "serialize"),
        ("Runtime", "deserialize_cuda_engine"),
        ("ICudaEngine", "get_tensor_profile_shape"),
        ("IExecutionContext", "set_input_shape"),
        ("IExecutionContext", "set_tensor_address"),
        ("IExecutionContext", "execute_async_v3"),
        ("ITensor", "dtype"),
    }, sorted(seen, key=str)


def test_every_name_exists_in_tensorrt_10_stubs(surfaces, our_uses):
    stubs, _ = surfaces
    assert missing_in_stubs(our_uses, stubs) == []


def test_every_name_exists_in_tensorrt_11_bindings(surfaces, our_uses):
    _, binary = surfaces
    assert missing_in_binary(our_uses, binary) == []


def test_weak_typing_names_are_caught(surfaces):
    """The check has teeth: names TensorRT 11 removed, or methods on the wrong class, are reported."""
    stubs, binary = surfaces
    source = """
def build(trt, engine: tensorrt.ICudaEngine):
    builder = trt.Builder(None)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    engine.set_input_shape("x", (1, 2))
    return builder.platform_has_fast_fp16
"""
    uses = collect_uses(source, "snippet.py", stubs)
    assert missing_in_stubs(uses, stubs) == ["snippet.py:7: ICudaEngine.set_input_shape"]
    gone = {line.split(": ")[1] for line in missing_in_binary(uses, binary)}
    assert gone == {"EXPLICIT_BATCH", "FP16", "platform_has_fast_fp16"}


def test_the_fake_only_defines_real_names(surfaces):
    stubs, binary = surfaces
    module = fake_tensorrt.make_fake_tensorrt()
    public = {n for n in vars(module) if not n.startswith("_") and n != "state"}
    assert public <= stubs.module and all(binary.lookup(n) for n in public)
