"""The artifact manifest: its schema, the agreement of its fields, and the digest that covers it.

The manifest hashes every other file of the artifact, so it cannot list its own hash: it carries
``manifest_sha256``, the sha256 of its canonical JSON (sorted keys, no whitespace) without that field.
An edit that does not recompute it (a slip, a naive tamper) is detected; a forger who recomputes it is
not, which is why the trust model (docs/security.md) treats an artifact like any other program input.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BadInput
from .fileio import read_json, write_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
DIGEST = "manifest_sha256"

Sha256 = Annotated[str, Field(strict=True, pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, Field(strict=True, min_length=1, max_length=4096)]
Count = Annotated[int, Field(strict=True, ge=0)]
Positive = Annotated[int, Field(strict=True, ge=1)]
Dim = Annotated[int, Field(strict=True, ge=0)] | Annotated[str, Field(strict=True, max_length=256)]


class _Fields(BaseModel):
    """Fields readers use are typed; anything else a manifest records is kept as it is."""

    model_config = ConfigDict(extra="allow")


class TensorSpec(_Fields):
    name: Text
    shape: list[Dim]
    dtype: Text | None = None


class GraphSpec(_Fields):
    file: Text
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Graphs(_Fields):
    sample: GraphSpec
    density: GraphSpec


class Logdet(_Fields):
    mode: Literal["exact", "series"]
    terms: Positive | None = None
    probes: Positive | None = None


class Inverse(_Fields):
    mode: Literal["loop", "unroll"]
    schedule: Literal["plain", "anderson"] = "plain"


class Iterations(_Fields):
    exported_total: Count


class Block(_Fields):
    block: Text
    guarantee: Literal["certified", "verified"]
    lipschitz_bound: Annotated[float, Field(strict=True, ge=0.0, lt=1.0)]
    n_iter: Annotated[int, Field(strict=True, ge=0, le=1_000_000)]


class Engine(_Fields):
    graph: Text
    file: Text
    sha256: Sha256


class Manifest(_Fields):
    format_version: Literal[2]
    preset: Text
    config: dict[str, Any]
    data_shape: Annotated[list[Positive], Field(min_length=1, max_length=4)]
    dim: Positive
    n_levels: Annotated[int, Field(strict=True, ge=2)] | None = None
    batch_axis: Text = "batch"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    logdet: Logdet
    inverse: Inverse
    iterations: Iterations
    graphs: Graphs
    blocks: list[Block]
    files: dict[Text, Sha256]
    max_safe_batch: Positive | None = None
    engines: dict[Text, Engine] = {}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``manifest`` without its ``manifest_sha256``."""
    body = {key: value for key, value in manifest.items() if key != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    """Stamp ``manifest`` (in place) with its digest and write it atomically."""
    manifest.pop(DIGEST, None)
    manifest[DIGEST] = manifest_digest(manifest)
    write_json(path, manifest)


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse, validate and integrity-check ``path``; one line naming the first problem otherwise."""
    manifest = read_json(path, "an artifact manifest")
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise BadInput(f"{path} has format version {found!r}, this acf-deploy reads {FORMAT_VERSION}; re-export")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "missing":
            raise BadInput(f"{path} lacks the field {where!r}; re-export") from None
        raise BadInput(f"{path} has a malformed field {where!r} ({error['msg']}); re-export") from None
    if manifest.get(DIGEST) != manifest_digest(manifest):
        raise BadInput(f"{path} does not match its manifest_sha256 (edited or corrupt); re-export")
    _check_agreement(manifest, path)
    return manifest


def _check_agreement(m: dict[str, Any], path: Path) -> None:
    """Fields that restate one another must agree (``dim`` and ``n_levels`` decide every score)."""
    shape, dim, axis = list(m["data_shape"]), m["dim"], m.get("batch_axis", "batch")
    config = m["config"]
    problems = []
    if dim != math.prod(shape):
        problems.append(f"dim {dim} is not the size of data_shape {shape}")
    if "data_shape" in config and config["data_shape"] != shape:
        problems.append(f"data_shape {shape} differs from the config's {config['data_shape']}")
    if "n_levels" in config and config["n_levels"] != m.get("n_levels"):
        problems.append(f"n_levels {m.get('n_levels')} differs from the config's {config['n_levels']}")
    logdet = m["logdet"]
    density_inputs = {"x": [axis, *shape]}
    if logdet["mode"] == "series":
        if logdet.get("probes") is None:
            problems.append("the series log-det lacks its probe count")
        density_inputs["probes"] = [axis, logdet.get("probes"), dim]
    expected = {"sample": {"z": [axis, dim], "temperature": [1]}, "density": density_inputs}
    for graph, inputs in expected.items():
        found = {t["name"]: t["shape"] for t in m["graphs"][graph]["inputs"]}
        if found.keys() != inputs.keys() or not all(_fits(found[k], inputs[k]) for k in inputs):
            problems.append(f"the {graph} graph's inputs {found} do not fit data_shape {shape} (expected {inputs})")
    files = m["files"]
    named = [g["file"] for g in m["graphs"].values()] + [e["file"] for e in m.get("engines", {}).values()]
    problems += [f"{name!r} is not among the hashed files" for name in named if name not in files]
    if problems:
        raise BadInput(f"{path}: {problems[0]}; re-export")


def _fits(found: list, expected: list) -> bool:
    """Same rank, and every static dimension as expected (a symbolic one constrains nothing)."""
    return len(found) == len(expected) and all(
        isinstance(f, str) or f == e for f, e in zip(found, expected, strict=True)
    )
