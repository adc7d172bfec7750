"""A toy artifact for the TensorRT code paths and the lint: two hand-written graphs, their numpy
references, and an artifact directory around them.

The toy is a tiny residual flow in data space (1, 2, 2): sampling inverts ``y = x + 0.5 tanh(x)`` with
a constant-trip-count ``Loop``; density evaluates it with a one-term Hutchinson log-det whose probes are
graph inputs. ``toy_sample_reference``/``toy_density_reference`` give the same numbers in numpy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from acf_deploy.fileio import sha256_file
from acf_deploy.manifest import FORMAT_VERSION, write_manifest

DIM = 4
DATA_SHAPE = (1, 2, 2)
PROBES = 2
N_ITER = 30
LEVELS = 17
OPSET = 18


def _const(name: str, value: Any, dtype: Any = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _tanh(src: list[str], dst: str, precision: str) -> list[onnx.NodeProto]:
    """tanh in the export precision between fp32 tensors: the explicitly cast graph of docs/guarantees.md §5."""
    if precision == "fp32":
        return [helper.make_node("Tanh", src, [dst], name=f"tanh_{dst}")]
    low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    return [
        helper.make_node("Cast", src, [f"{dst}_in_low"], to=low, name=f"to_low_{dst}"),
        helper.make_node("Tanh", [f"{dst}_in_low"], [f"{dst}_low"], name=f"tanh_{dst}"),
        helper.make_node("Cast", [f"{dst}_low"], [dst], to=TensorProto.FLOAT, name=f"to_fp32_{dst}"),
    ]


def toy_sample_graph(precision: str = "fp32") -> onnx.ModelProto:
    """z (batch, 4), temperature [1] -> x (batch, 1, 2, 2), residual (batch,)."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            *_tanh(["x_in"], "t", precision),
            helper.make_node("Mul", ["t", "half"], ["g"], name="g"),
            helper.make_node("Sub", ["y", "g"], ["x_out"], name="update"),
        ],
        "fixed_point",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["z", "temperature"], ["y"], name="scale"),
            helper.make_node("Loop", ["n_iter", "", "y"], ["x_flat"], body=body, name="inverse"),
            helper.make_node("Tanh", ["x_flat"], ["t_last"], name="tanh_last"),
            helper.make_node("Mul", ["t_last", "half"], ["g_last"], name="g_last"),
            helper.make_node("Add", ["x_flat", "g_last"], ["y_back"], name="forward"),
            helper.make_node("Sub", ["y_back", "y"], ["diff"], name="diff"),
            helper.make_node("Abs", ["diff"], ["abs_diff"], name="abs"),
            helper.make_node("ReduceMax", ["abs_diff", "axis1"], ["residual"], keepdims=0, name="residual"),
            helper.make_node("Reshape", ["x_flat", "image_shape"], ["x"], name="to_image"),
        ],
        "sample",
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", DIM]),
            helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *DATA_SHAPE]),
            helper.make_tensor_value_info("residual", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=[
            _const("n_iter", N_ITER, np.int64),
            _const("half", 0.5),
            _const("axis1", [1], np.int64),
            _const("image_shape", [-1, *DATA_SHAPE], np.int64),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def toy_density_graph(precision: str = "fp32") -> onnx.ModelProto:
    """x (batch, 1, 2, 2), probes (batch, P, 4) -> z, log_prob, bits_per_dim."""
    log_norm = -0.5 * DIM * math.log(2 * math.pi)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "flat_shape"], ["f"], name="flatten"),
            *_tanh(["f"], "t", precision),
            helper.make_node("Mul", ["t", "half"], ["g"], name="g"),
            helper.make_node("Add", ["f", "g"], ["z"], name="forward"),
            helper.make_node("Mul", ["t", "t"], ["t2"], name="t2"),
            helper.make_node("Sub", ["one", "t2"], ["sech2"], name="sech2"),
            helper.make_node("Mul", ["sech2", "half"], ["jac_diag"], name="jac_diag"),
            helper.make_node("Unsqueeze", ["jac_diag", "axis1"], ["jac_b"], name="jac_b"),
            helper.make_node("Mul", ["probes", "jac_b"], ["jv"], name="jvp"),
            helper.make_node("Mul", ["jv", "probes"], ["vjv"], name="vjv"),
            helper.make_node("ReduceSum", ["vjv", "axis2"], ["per_probe"], keepdims=0, name="trace_terms"),
            helper.make_node("ReduceMean", ["per_probe", "axis1"], ["logdet"], keepdims=0, name="logdet"),
            helper.make_node("Mul", ["z", "z"], ["z2"], name="z2"),
            helper.make_node("ReduceSum", ["z2", "axis1"], ["sq"], keepdims=0, name="sq"),
            helper.make_node("Mul", ["sq", "minus_half"], ["log_gauss"], name="log_gauss"),
            helper.make_node("Add", ["log_gauss", "log_norm"], ["log_pz"], name="log_pz"),
            helper.make_node("Add", ["log_pz", "logdet"], ["log_prob"], name="log_prob"),
            helper.make_node("Sub", ["d_log_k", "log_prob"], ["nats"], name="nats"),
            helper.make_node("Div", ["nats", "d_log_2"], ["bits_per_dim"], name="bpd"),
        ],
        "density",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *DATA_SHAPE]),
            helper.make_tensor_value_info("probes", TensorProto.FLOAT, ["batch", PROBES, DIM]),
        ],
        [
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", DIM]),
            helper.make_tensor_value_info("log_prob", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("bits_per_dim", TensorProto.FLOAT, ["batch"]),
        ],
        initializer=[
            _const("flat_shape", [-1, DIM], np.int64),
            _const("half", 0.5),
            _const("one", 1.0),
            _const("minus_half", -0.5),
            _const("axis1", [1], np.int64),
            _const("axis2", [2], np.int64),
            _const("log_norm", log_norm),
            _const("d_log_k", DIM * math.log(LEVELS)),
            _const("d_log_2", DIM * math.log(2)),
            # Large enough to be written as external data when the artifact asks for it.
            _const("unused_weight", np.zeros((64, 64))),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def toy_sample_reference(z: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    y = z.astype(np.float64) * temperature
    x = y.copy()
    for _ in range(N_ITER):
        x = y - 0.5 * np.tanh(x)
    residual = np.abs(x + 0.5 * np.tanh(x) - y).max(axis=1)
    return {"x": x.reshape(-1, *DATA_SHAPE), "residual": residual}


def toy_density_reference(x: np.ndarray, probes: np.ndarray) -> dict[str, np.ndarray]:
    f = x.reshape(len(x), DIM).astype(np.float64)
    z = f + 0.5 * np.tanh(f)
    jac = 0.5 * (1 - np.tanh(f) ** 2)
    logdet = (probes * jac[:, None, :] * probes).sum(axis=2).mean(axis=1)
    log_prob = -0.5 * (z**2).sum(axis=1) - 0.5 * DIM * math.log(2 * math.pi) + logdet
    bpd = (DIM * math.log(LEVELS) - log_prob) / (DIM * math.log(2))
    return {"z": z, "log_prob": log_prob, "bits_per_dim": bpd}


def _io(graph: onnx.GraphProto) -> dict[str, list[dict[str, Any]]]:
    def spec(values: Any) -> list[dict[str, Any]]:
        return [
            {"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
            for v in values
        ]

    return {"inputs": spec(graph.input), "outputs": spec(graph.output)}


def write_artifact(
    root: Path,
    sample: onnx.ModelProto | None = None,
    density: onnx.ModelProto | None = None,
    precision: str = "fp32",
    external_data: bool = False,
) -> Path:
    """Write an artifact directory with a manifest hashing every file."""
    root.mkdir(parents=True, exist_ok=True)
    graphs = {
        "sample": sample or toy_sample_graph(precision),
        "density": density or toy_density_graph(precision),
    }
    files = []
    for name, model in graphs.items():
        if external_data and name == "density":
            onnx.save_model(
                model,
                root / f"{name}.onnx",
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=f"{name}.onnx.data",
                size_threshold=1024,
            )
            files.append(f"{name}.onnx.data")
        else:
            onnx.save_model(model, root / f"{name}.onnx")
        files.append(f"{name}.onnx")
    manifest = {
        "format_version": FORMAT_VERSION,
        "graphs": {name: {"file": f"{name}.onnx", **_io(model.graph)} for name, model in graphs.items()},
        "files": {name: sha256_file(root / name) for name in files},
        "data_shape": list(DATA_SHAPE),
        "dim": DIM,
        "logdet": {"mode": "series", "probes": PROBES}
        if any(v.name == "probes" for v in graphs["density"].graph.input)
        else {"mode": "exact"},
        "batch_axis": "batch",
        "precision": precision,
        "preset": "toy-resflow",
        "config": {"preset": "toy-resflow", "data": "moons"},
        "blocks": [],
        "inverse": {"mode": "loop"},
        "iterations": {"exported_total": 0},
    }
    write_manifest(root / "manifest.json", manifest)
    return root
