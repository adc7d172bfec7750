"""The ``acf-deploy`` command line: thin wrappers that parse, call the library and render with rich.

Exit codes: 0 ok, 1 check failed, 2 bad usage or bad input, 3 backend unavailable, 4 internal error (a
bug), 130 interrupted (SIGINT or SIGTERM). Every failure is one line on stderr; ``--debug`` (or
``ACF_DEPLOY_DEBUG=1``) adds the traceback of an internal error.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from . import __version__
from .errors import AcfError


def _flags_as_flags(params: list) -> list:
    """Help shows ``--json``, not ``--json <bool>``: an on/off option takes no value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Group(TyperGroup):
    def get_params(self, ctx: click.Context) -> list:
        return _flags_as_flags(super().get_params(ctx))


class _Command(TyperCommand):
    def get_params(self, ctx: click.Context) -> list:
        return _flags_as_flags(super().get_params(ctx))


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    cls=_Group,
    help="Deploy Attentive Contractive Flows: export, verify, serve.",
)
console = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable[..., Any])


DEBUG_ENV = "ACF_DEPLOY_DEBUG"
INTERNAL_ERROR = 4
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        out.print(f"acf-deploy {__version__}", highlight=False)
        raise typer.Exit()


#: How long PyTorch's OpenMP workers (libgomp) spin before they sleep. By default they spin long enough that
#: two PyTorch processes on the same cores take turns on every small operator: with another one busy, a digits
#: block's evaluation took 37 ms instead of 2.5 ms (and 330 ms with two such neighbours). Spinning 2000 rounds
#: keeps that at 2.5 ms and costs eager sampling on a quiet machine at most 25 % (73 -> 91 ms at batch 64; never
#: sleeping cost 2.5x). ``bench`` keeps the default, so its eager baseline runs at its quiet-machine best.
OPENMP_SPINCOUNT = "2000"


@app.callback()
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help=f"Print the traceback of an internal error (or {DEBUG_ENV}=1)."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """acf-deploy: trained Attentive Contractive Flows to verified ONNX / TensorRT deployments."""
    _state["debug"] = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if ctx.invoked_subcommand != "bench":  # before torch is imported; the user's own setting wins
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPINCOUNT)


def _fail(message: str, code: int) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt like SIGINT, so every temporary is removed on the way out."""

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _debug_traceback() -> None:
    if _state["debug"]:
        traceback.print_exc(file=sys.stderr)


def handle_errors(fn: F) -> F:
    """Every failure becomes one red line and its documented exit code, never a traceback.

    Library errors carry their code; a file-system error (permissions, a full disk) or exhausted memory
    is the user's input (2); anything else is a bug (4), with the traceback only under ``--debug``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _sigterm_interrupts():
                return fn(*args, **kwargs)
        except AcfError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]")
            raise typer.Exit(130) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except MemoryError:
            _debug_traceback()
            raise _fail("out of memory: use a smaller --batch, --n or input", 2) from None
        except OSError as exc:
            _debug_traceback()
            where = f"{exc.filename}: " if exc.filename else ""
            raise _fail(f"{where}{exc.strerror or exc}", 2) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence: a bug, reported as one
            _debug_traceback()
            summary = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise _fail(
                f"internal error, a bug in acf-deploy ({type(exc).__name__}: {summary}); "
                "please report it with the output of `acf-deploy --debug ...`",
                INTERNAL_ERROR,
            ) from None

    return wrapper  # type: ignore[return-value]


class _Progress(Progress):
    """A progress bar that vanishes when its job fails, so the error stays the one line on stderr."""

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.live.transient = True
        super().__exit__(exc_type, exc, tb)


def progress() -> Progress:
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class _StageBars:
    """One bar per stage of a job (``acf_deploy.progress.Reporter``), each with its own elapsed time."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task: Any = None

    def stage(self, name: str, total: int) -> None:
        self.task = self.bar.add_task(name, total=total, info="")

    def advance(self, note: str = "") -> None:
        self.bar.update(self.task, advance=1, info=note)


#: The backends of ``acf_deploy.runtime.open_backend`` (a test keeps the two lists equal).
BACKEND_CHOICES = ("torch", "ort", "ort-cuda", "ort-trt", "trt", "torch-compile", "openvino", "openvino-static")


def _backend_option(what: str) -> Any:
    return typer.Option(
        "ort",
        metavar="|".join(BACKEND_CHOICES),
        help=f"{what} torch: the PyTorch reference; ort: ONNX Runtime on the CPU; ort-cuda, ort-trt: its CUDA and "
        "TensorRT providers; trt: TensorRT engines from `build`; torch-compile: torch.compile of the reference (compiles "
        "for minutes first); openvino, openvino-static: OpenVINO on the CPU (acf-deploy[openvino]), static compiling "
        "per batch size.",
    )


def print_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=float) + "\n")


@app.command(cls=_Command)
@handle_errors
def train(
    preset: str = typer.Argument(..., help="Preset name, e.g. digits-acf-l2."),
    out_dir: Path = typer.Option(..., "--out", help="Checkpoint directory."),
    epochs: int | None = typer.Option(None, help="Epochs (preset default if omitted)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Training batch size (preset default if omitted)."
    ),
    lr: float | None = typer.Option(None, help="Peak learning rate (preset default if omitted)."),
    seed: int = typer.Option(
        0, help="Seed of initialisation, data order and noise (the same seed gives the same result)."
    ),
    resume: bool = typer.Option(False, help="Continue from the last epoch checkpoint in --out."),
    data: Path | None = typer.Option(None, help="Local data file for mnist/cifar presets (.npz, IDX, PNG folder)."),
) -> None:
    """Train a preset on its data; writes an EMA checkpoint every epoch, then the held-out report."""
    from .errors import BadInput
    from .flows.presets import PRESETS, preset_config
    from .pipeline import train_preset

    if preset not in PRESETS:
        raise BadInput(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    train_hp = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items() if v is not None}
    overrides: dict[str, Any] = {"train": train_hp}
    if data is not None:
        overrides["data_path"] = str(data)
    config = preset_config(preset, **overrides)
    hp = config["train"]
    with progress() as bar:
        task = bar.add_task(f"train {preset}", total=hp["epochs"], info="")
        step_task = bar.add_task("  epoch", total=1, info="")

        def on_step(state: dict[str, float]) -> None:
            bar.update(step_task, total=state["steps"], completed=state["step"], info=f"loss {state['loss']:.3f}")

        def on_epoch(epoch: int, record: dict[str, float]) -> None:
            label = "bits/dim (unbiased est.)" if config["n_levels"] else "nll (nats)"
            bar.update(task, completed=epoch + 1, info=f"{label} {record['train_estimate']:.3f}")

        metrics = train_preset(preset, out_dir, overrides, seed=seed, resume=resume, on_step=on_step, on_epoch=on_epoch)
    render_training(metrics)


def render_training(metrics: dict[str, Any]) -> None:
    key = "heldout_bits_per_dim" if "heldout_bits_per_dim" in metrics else "heldout_nll_nats"
    out.print(
        f"held-out {key.split('_', 1)[1].replace('_', ' ')}: [bold]{metrics[key]:.4f}[/bold] "
        f"(exact log-det), trained in {metrics['train_seconds']:.0f} s"
    )
    render_blocks(metrics["blocks"], "per-block Lipschitz constants")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@app.command("import", cls=_Command)
@handle_errors
def import_cmd(
    checkpoint: Path = typer.Argument(..., help="A .pth written by train_img.py of Residual Flows or the ACF code."),
    out_dir: Path = typer.Option(..., "--out", help="Checkpoint directory to write (model.safetensors + model.json)."),
    weights: str = typer.Option(
        "ema", metavar="ema|raw", help="ema (the EMA weights the reference evaluates with) | raw."
    ),
    data: Path | None = typer.Option(
        None, help="The model's data in its levels (.npy, .npz, IDX, CIFAR-10 .bin) to measure blocks on."
    ),
    seed: int = typer.Option(0, help="Seed of the model samples the blocks are measured on."),
    json_out: bool = typer.Option(False, "--json", help="The import report as JSON."),
) -> None:
    """Import a Residual Flows or ACF checkpoint: rebuild it, certify or measure every block, write a checkpoint."""
    from .importer import import_checkpoint

    with console.status("importing") as status:
        result = import_checkpoint(checkpoint, out_dir, weights, data, seed, log=lambda msg: status.update(msg))
    if json_out:
        print_json({"checkpoint": str(result.directory), "provenance": result.provenance, "blocks": result.blocks})
        return
    arch = result.config["reference"]
    attention = f"{arch['attention']} attention" if arch["attention"] else "no attention"
    out.print(
        f"[green]imported[/green] {result.provenance['source']} ({attention}, {result.provenance['weights']} weights) "
        f"to {result.directory}"
    )
    render_blocks(result.blocks, "per-block guarantees")


def render_blocks(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    columns = ("block", "kind", "guarantee", "certified bound", "measured L", "gate", "gain/bound", "attention share")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["block"],
            row["kind"],
            row["guarantee"],
            _fmt(row.get("lipschitz_certified")),
            _fmt(row["lipschitz_measured"]),
            _fmt(row.get("gate", row.get("gamma"))),
            _fmt(row.get("attention_gain")),
            _fmt(row.get("attention_share")),
        )
    out.print(table)


def _open(artifact_dir: Path):
    from .artifact import open_artifact

    return open_artifact(artifact_dir)


@app.command(cls=_Command)
@handle_errors
def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory (model.safetensors + model.json)."),
    out_dir: Path = typer.Option(..., "--out", help="Artifact directory to write (atomically)."),
    logdet: str | None = typer.Option(
        None, metavar="exact|series", help="exact | series (default: exact when D <= 256)."
    ),
    terms: int = typer.Option(10, help="Series terms (series mode)."),
    probes: int = typer.Option(4, help="Rademacher probes per sample (series mode)."),
    inverse: str = typer.Option(
        "loop", metavar="loop|unroll", help="loop | unroll: how fixed-point iterations appear in sample.onnx."
    ),
    schedule: str = typer.Option(
        "plain",
        metavar="plain|anderson",
        help="plain | anderson: fixed-point iterations as they are, or Anderson-accelerated (fewer, calibrated the same "
        "way; each block's last step stays plain, so the residual output still bounds the error).",
    ),
    iters: str = typer.Option("calibrated", help="calibrated | certified | N iterations per block."),
    tol: float = typer.Option(1e-5, help="Per-block fixed-point tolerance (max-abs)."),
    precision: str = typer.Option(
        "fp32",
        metavar="fp32|fp16|bf16",
        help="fp32 | fp16 | bf16: half exports cast explicitly, with fp32 islands (LU, log-dets, sums).",
    ),
    opset: int = typer.Option(17, help="ONNX opset (bf16 raises it to 22, the first with bfloat16 Conv)."),
    seed: int = typer.Option(0, help="Seed of calibration, measurement and the golden batch."),
    data: Path | None = typer.Option(
        None,
        help="Held-out data in the model's levels (.npy, .npz, IDX, CIFAR-10 .bin) to calibrate and check on "
        "(default: the preset's test split; an imported model without it uses its own samples).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
) -> None:
    """Export a checkpoint to sample.onnx + density.onnx, verified against PyTorch before it counts."""
    from .pipeline import ExportOptions, export_artifact

    opts = ExportOptions(
        logdet=logdet,
        terms=terms,
        probes=probes,
        inverse=inverse,
        schedule=schedule,
        iters=iters,
        tol=tol,
        precision=precision,
        opset=opset,
        seed=seed,
        data=None if data is None else str(data),
    )
    with progress() as bar:
        artifact = export_artifact(checkpoint, out_dir, opts, progress=_StageBars(bar))
    summary = export_summary(artifact.manifest)
    if json_out:
        print_json(summary)
    else:
        render_export(artifact.root, summary)


def export_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "preset": manifest["preset"],
        "logdet": manifest["logdet"]["mode"],
        "inverse": manifest["inverse"]["mode"],
        "schedule": manifest["inverse"].get("schedule", "plain"),
        "iterations": manifest["iterations"],
        "nodes": {g: manifest["graphs"][g]["nodes"] for g in ("sample", "density")},
        "roundtrip": manifest["roundtrip"],
        "export_seconds": manifest["export_timings"]["total_s"],
        "max_safe_batch": manifest["max_safe_batch"],
        "precision": manifest.get("precision", "fp32"),
        "half_tensor_fraction": manifest.get("precision_detail", {}).get("half_tensor_fraction"),
        "verified": manifest.get("verified", True),
        "verification": manifest.get("verification"),
    }


def render_export(root: Path, summary: dict[str, Any]) -> None:
    it = summary["iterations"]
    out.print(
        f"[green]exported[/green] {summary['preset']} to {root} in {summary['export_seconds']:.1f} s "
        f"(log-det {summary['logdet']}, inverse {summary['inverse']}, {summary['schedule']} iterations)"
    )
    out.print(
        f"iterations: exported {it['exported_total']}, calibrated {it['calibrated_total']}, "
        f"certified {it['certified_total']}; nodes: sample {summary['nodes']['sample']}, "
        f"density {summary['nodes']['density']}"
    )
    verification = summary.get("verification") or {}
    if summary.get("half_tensor_fraction"):
        shares = ", ".join(f"{g} {v:.0%}" for g, v in summary["half_tensor_fraction"].items())
        out.print(f"precision {summary['precision']}: half tensors {shares}; {verification.get('method', '')}")
    if not summary.get("verified", True):
        out.print(f"[yellow]UNVERIFIED[/yellow]: {escape(str(verification.get('reason')))}")


@app.command(cls=_Command)
@handle_errors
def check(
    artifact_dir: Path = typer.Argument(..., help="Artifact directory from `export`."),
    backend: str = _backend_option("Backend to check."),
    n: int = typer.Option(1024, help="Seeded inputs per graph."),
    against: str = typer.Option(
        "torch", metavar="torch|golden", help="torch (rebuild the model) or golden (golden.npz, no PyTorch)."
    ),
    atol: float = typer.Option(1e-4, help="Absolute tolerance per output value (fp32; density outputs at least 1e-3)."),
    rtol: float = typer.Option(1e-4, help="Relative tolerance per output value, times the reference's magnitude."),
    seed: int = typer.Option(0, help="Seed of the latents, dequantisation noise and probes."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Parity of a backend against PyTorch or golden.npz: errors per output, bits/dim, round trips."""
    from .errors import BackendUnavailable, BadInput, CheckFailed
    from .runtime import open_backend
    from .runtime.parity import compare_backends, compare_golden

    if against not in ("torch", "golden"):
        raise BadInput(f"--against must be torch or golden, not {against!r}")
    if n < 1:
        raise BadInput("--n must be at least 1")
    artifact = _open(artifact_dir)
    with open_backend(backend, artifact) as runner:
        if against == "golden":
            result = compare_golden(artifact, runner, atol, rtol)
        else:
            with open_backend("torch", artifact) as reference:
                result = compare_backends(artifact, runner, reference, n, seed, atol, rtol)
    if json_out:
        print_json(result.to_json())
    else:
        render_check(result)
    if result.status == "unverified":
        # Not passed, not failed: this backend cannot run the artifact's precision (exit 3).
        raise BackendUnavailable(result.summary())
    if not result.passed:
        raise CheckFailed(f"check failed: {result.summary()}")


def _ok_cell(passed: bool, precision: str) -> str:
    """Per-output tolerances bind at fp32 only; at half precision they are reported, not judged."""
    if precision != "fp32":
        return "[dim]n/a[/dim]"
    return "[green]yes[/green]" if passed else "[red]no[/red]"


def render_check(result) -> None:
    table = Table(title=f"{result.backend} vs {result.against} ({result.n} inputs)")
    for column in ("output", "max abs", "mean abs", "p99 abs", "max rel", "atol needed", "ok"):
        table.add_column(column)
    for o in result.outputs:
        table.add_row(
            o.name,
            f"{o.max_abs:.2e}",
            f"{o.mean_abs:.2e}",
            f"{o.p99_abs:.2e}",
            f"{o.max_rel:.2e}",
            f"{o.atol_needed:.2e}",
            _ok_cell(o.passed, result.precision),
        )
    out.print(table)
    metrics = Table(title=f"metrics ({result.precision} limits of docs/guarantees.md §5)")
    for column in ("metric", "value", "limit"):
        metrics.add_column(column)
    for key, value in result.metrics.items():
        metrics.add_row(key, f"{value:.4g}", f"{result.limits[key]:g}" if key in result.limits else "")
    out.print(metrics)
    if result.note:
        out.print(f"note: {escape(result.note)}")
    if result.status == "unverified":
        verdict = f"[yellow]UNVERIFIED[/yellow] (not passed): {escape('; '.join(result.failures))}"
    elif result.passed:
        verdict = "[green]PASSED[/green]"
    else:
        verdict = f"[red]FAILED[/red]: {escape(result.summary())}"
    out.print(verdict)


# Options `sample` and `score` share (one definition each, so their help cannot drift apart).
ENGINE = typer.Option(
    "local",
    metavar="local|ray",
    help="local (one process) or ray (shards over Ray workers; bit-identical for the same --threads).",
)
ADDRESS = typer.Option(None, help="Ray cluster address (ray engine); default: start a local one.")
WORKERS = typer.Option(2, help="Ray workers, one backend each (ray engine).")
THREADS = typer.Option(
    None,
    help="Threads per backend: intra-op for torch, concurrent runs over batch shards for ONNX Runtime on the CPU "
    "(default: all cores; 1 with ray).",
)


def _ray_options(address: str | None, workers: int):
    """The Ray options the job uses with ``--engine ray`` (and refuses without it); retries are reported as
    they happen."""
    from .runtime.distributed import RayOptions

    return RayOptions(workers=workers, address=address, on_event=lambda msg: console.print(f"[yellow]{msg}[/yellow]"))


@app.command(cls=_Command)
@handle_errors
def sample(
    artifact_dir: Path = typer.Argument(..., help="Artifact directory from `export`."),
    n: int = typer.Option(64, "--n", help="Number of samples."),
    backend: str = _backend_option("Backend to sample with."),
    temperature: float = typer.Option(1.0, help="Scale of the latents z (below 1: more typical samples)."),
    out_file: Path = typer.Option(..., "--out", help=".png grid or .npy array (data space, [0, 1] for images)."),
    seed: int = typer.Option(0, help="Seed of the latents (batch by batch: any engine gives the same samples)."),
    batch: int = typer.Option(256, help="Samples per backend call."),
    engine: str = ENGINE,
    address: str | None = ADDRESS,
    workers: int = WORKERS,
    threads: int | None = THREADS,
) -> None:
    """Draw samples through the exported fixed-iteration inverse, streamed in batches."""
    from .runtime.jobs import sample_job

    artifact = _open(artifact_dir)
    with progress() as bar:
        task = bar.add_task(f"sample ({engine})", total=n, info="")
        stats = sample_job(
            artifact,
            n,
            out_file,
            backend=backend,
            temperature=temperature,
            seed=seed,
            batch=batch,
            engine=engine,
            threads=threads,
            options=_ray_options(address, workers),
            on_progress=lambda k: bar.advance(task, k),
        )
    retries = f", {stats['retries']} shard retries" if stats.get("retries") else ""
    out.print(f"wrote {n} samples to {out_file} (largest fixed-point residual {stats['residual_max']:.2e}{retries})")


@app.command(cls=_Command)
@handle_errors
def score(
    artifact_dir: Path = typer.Argument(..., help="Artifact directory from `export`."),
    data: str = typer.Argument(..., help=".npy/.npz in the dataset's native levels, or digits-test."),
    backend: str = _backend_option("Backend to score with."),
    out_file: Path | None = typer.Option(None, "--out", help="Per-sample log-likelihoods (.npy)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
    seed: int = typer.Option(0, help="Seed of the dequantisation noise and probes (batch by batch)."),
    batch: int = typer.Option(256, help="Rows per backend call (at most the artifact's largest safe batch)."),
    engine: str = ENGINE,
    address: str | None = ADDRESS,
    workers: int = WORKERS,
    threads: int | None = THREADS,
) -> None:
    """Per-sample log-likelihood (nats) and the dataset's bits/dim."""
    from .runtime.jobs import load_score_data, score_job

    artifact = _open(artifact_dir)
    array = load_score_data(artifact, data)
    with progress() as bar:
        task = bar.add_task(f"score ({engine})", total=len(array), info="")
        log_lik, bpd, report = score_job(
            artifact,
            array,
            backend=backend,
            seed=seed,
            batch=batch,
            engine=engine,
            threads=threads,
            options=_ray_options(address, workers),
            target=out_file,
            on_progress=lambda k: bar.advance(task, k),
        )
    payload = {"n": len(array), "bits_per_dim": bpd, "mean_log_likelihood_nats": float(log_lik.mean())}
    if engine == "ray":
        payload.update(engine="ray", shards=report["shards"], retries=report["retries"], workers=report["workers"])
    if json_out:
        print_json(payload)
    else:
        out.print(
            f"{len(array)} samples: bits/dim [bold]{bpd:.4f}[/bold], mean log-likelihood {log_lik.mean():.3f} nats"
        )


@app.command(cls=_Command)
@handle_errors
def triton(
    artifact_dir: Path = typer.Argument(..., help="Artifact directory from `export`."),
    repo: Path = typer.Option(..., "--repo", help="Triton model repository to create or add a version to."),
    backend: str = typer.Option(
        "onnxruntime", metavar="onnxruntime|tensorrt", help="onnxruntime | tensorrt (plans built on the serving host)."
    ),
    max_batch: int | None = typer.Option(None, "--max-batch", help="max_batch_size (default min(256, safe batch))."),
    instances: int = typer.Option(1, help="Model instances per model (instance_group count)."),
    dynamic_batching: bool = typer.Option(False, "--dynamic-batching", help="Let Triton merge requests."),
    queue_delay_us: int = typer.Option(100, "--queue-delay-us", help="Dynamic batching: longest wait for a batch."),
    kind: str | None = typer.Option(
        None, metavar="cpu|gpu", help="cpu | gpu instances (default gpu for TensorRT, else cpu)."
    ),
    ort_tensorrt: bool = typer.Option(
        False, "--ort-tensorrt", help="onnxruntime backend with its TensorRT execution accelerator (GPU)."
    ),
    name: str | None = typer.Option(None, help="Model name prefix (default: the preset): NAME-sample, NAME-density."),
    json_out: bool = typer.Option(False, "--json", help="The repository summary as JSON."),
) -> None:
    """Write a Triton model repository (sampling + density models); re-running adds a new version."""
    from .exporters.triton import TritonOptions, write_triton_repository

    options = TritonOptions(
        backend=backend,
        max_batch=max_batch,
        instances=instances,
        dynamic_batching=dynamic_batching,
        queue_delay_us=queue_delay_us,
        kind=kind,
        ort_tensorrt=ort_tensorrt,
        name=name,
    )
    summary = write_triton_repository(artifact_dir, repo, options)
    if json_out:
        print_json(summary)
        return
    table = Table(title=f"Triton repository {repo} (version {summary['version']}, backend {backend})")
    for column in ("model", "inputs", "outputs"):
        table.add_column(column)
    for model, entry in summary["models"].items():
        table.add_row(
            model,
            ", ".join(f"{t['name']} {t['shape']}" for t in entry["inputs"]),
            ", ".join(f"{t['name']} {t['shape']}" for t in entry["outputs"]),
        )
    out.print(table)
    if "build_script" in summary:
        out.print(f"[yellow]build the TensorRT plans on the serving host:[/yellow] {summary['build_script']}")
    out.print(f"how to serve and query it: {summary['readme']}")


@app.command(cls=_Command)
@handle_errors
def inspect(
    target: Path = typer.Argument(..., help="Artifact directory or a .onnx file."),
    trt: bool = typer.Option(False, "--trt", help="Lint every node against TensorRT's ONNX support (CPU only)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Node count, op histogram, opset, inputs/outputs, manifest summary; --trt lints for TensorRT."""
    from .errors import CheckFailed
    from .exporters.inspect import inspect_target

    report = inspect_target(target, trt)
    if json_out:
        print_json(report)
    else:
        render_inspect(report)
    lint_errors = [i for g in report.get("trt_lint", {}).values() for i in g if i["severity"] == "error"]
    if lint_errors:
        raise CheckFailed(f"TensorRT lint found {len(lint_errors)} errors (listed above)")


def render_inspect(report: dict[str, Any]) -> None:
    for name, graph in report["graphs"].items():
        ops = ", ".join(f"{op} {count}" for op, count in list(graph["ops"].items())[:12])
        out.print(f"[bold]{escape(name)}[/bold]: {graph['nodes']} nodes (incl. loop bodies), opset {graph['opset']}")
        # shapes such as [batch, 2] are text, not rich markup
        out.print(
            f"  inputs: {', '.join(graph['inputs'])}\n  outputs: {', '.join(graph['outputs'])}\n  ops: {ops}",
            markup=False,
        )
    if "manifest" in report:
        render_manifest(report["manifest"])
    for name, issues in report.get("trt_lint", {}).items():
        if not issues:
            out.print(f"[green]TensorRT lint: {name} clean[/green]")
        for issue in issues:
            colour = "red" if issue["severity"] == "error" else "yellow"
            out.print(
                f"[{colour}]{issue['severity']}[/{colour}] "
                + escape(f"{name}:{issue['graph']}:{issue['node']} ({issue['op_type']}): {issue['message']}"),
                highlight=False,
            )


def render_manifest(manifest: dict[str, Any]) -> None:
    """The manifest summary of ``inspect``: settings, iteration totals, one row per residual block."""
    it = manifest["iterations"]
    out.print(
        f"[bold]manifest[/bold]: {escape(str(manifest['preset']))}, {manifest['precision']}, "
        f"log-det {manifest['logdet']}, inverse {manifest['inverse']}, largest safe batch {manifest['max_safe_batch']}"
    )
    line = (
        f"  iterations: exported {it['exported_total']}, calibrated {it['calibrated_total']}, "
        f"certified {it['certified_total']}"
    )
    if "oracle_mean_total" in it:
        line += f"; per-sample oracle mean {it['oracle_mean_total']:.1f}, max {it['oracle_max_total']:.0f}"
    out.print(line)
    if manifest["blocks"]:
        table = Table(title="residual blocks")
        for column in ("block", "guarantee", "Lipschitz bound", "iterations"):
            table.add_column(column)
        for block in manifest["blocks"]:
            table.add_row(block["block"], block["guarantee"], _fmt(block["lipschitz_bound"]), str(block["n_iter"]))
        out.print(table)


@app.command(cls=_Command)
@handle_errors
def build(
    artifact_dir: Path = typer.Argument(..., help="Artifact directory from `export`."),
    precision: str = typer.Option(
        "fp32", metavar="fp32|fp16|bf16", help="fp32 | fp16 | bf16 (must match the export's precision)."
    ),
    batch: str = typer.Option("1:64:1024", help="Optimization profile on the batch axis, MIN:OPT:MAX."),
    workspace: int = typer.Option(4096, help="Workspace memory pool limit in MB."),
    timing_cache: Path | None = typer.Option(None, "--timing-cache", help="Timing cache file, reused across builds."),
) -> None:
    """Build TensorRT engines for both graphs (reused when the engine cache key matches)."""
    from .exporters.tensorrt import build_engines, parse_batch

    result = build_engines(artifact_dir, precision, parse_batch(batch), workspace, timing_cache)
    for graph, entry in result["engines"].items():
        state = "reused" if entry.get("reused") else f"built in {entry.get('build_s', 0):.1f} s"
        out.print(f"{graph}: {entry['file']} ({state})")


def _csv(text: str, kind: type = str) -> list:
    from .errors import BadInput

    try:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInput(f"cannot parse {text!r} as a comma-separated list of {kind.__name__}") from None


@app.command(cls=_Command)
@handle_errors
def bench(
    artifact_dir: Path = typer.Argument(..., help="Artifact directory from `export`."),
    backends: str = typer.Option(
        "torch,ort",
        help="Comma-separated: torch, ort, ort-cuda, ort-trt, trt, resflow, and the peers torch-compile, openvino, "
        "openvino-static (skipped with a reason where unavailable; eager torch is always run).",
    ),
    batch: str = typer.Option("1,64,256", help="Comma-separated batch sizes."),
    what: str = typer.Option("sample,density", help="sample and/or density."),
    repeats: int = typer.Option(20, help="Timed rounds per cell (each round calls every backend once)."),
    warmup: int = typer.Option(3, help="Untimed calls per backend before timing."),
    threads: int | None = typer.Option(
        None, help="Threads for every backend and the matmul peak (default: all cores)."
    ),
    max_seconds: float = typer.Option(
        20.0, "--max-seconds", help="Stop a cell's rounds after this long (>= 3 rounds)."
    ),
    resflow_tol: float | None = typer.Option(
        None, "--resflow-tol", help="Tolerance of the resflow baseline (default: loosest matching our round trip)."
    ),
    seed: int = typer.Option(0, help="Seed of the benchmark inputs."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Time backends side by side: latency, samples/s, speed-up over eager PyTorch, FLOP/s vs matmul peak."""
    from .runtime.bench import BenchOptions, run_bench

    opts = BenchOptions(
        backends=_csv(backends),
        batches=_csv(batch, int),
        what=_csv(what),
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        seed=seed,
        max_seconds=max_seconds,
        resflow_tol=resflow_tol,
    )
    artifact = _open(artifact_dir)
    with console.status("benchmarking") as status:
        report = run_bench(artifact, opts, log=lambda msg: status.update(msg))
    if json_out:
        print_json(report)
    else:
        render_bench(report)


def render_bench(report: dict[str, Any]) -> None:
    machine, art = report["machine"], report["artifact"]
    out.print(
        f"{art['preset']} ({art['inverse'].get('mode')} inverse, {sum(art['iterations']['per_block'])} iterations, "
        f"log-det {art['logdet'].get('mode')}) on {machine['cpu']}, {machine['threads']} thread(s), "
        f"fp32 matmul peak {machine['matmul_peak']['gflops']:.1f} GFLOP/s"
    )
    table = Table(title="acf-deploy bench")
    columns = ["graph", "batch", "backend", "median ms", "p90 ms", "samples/s", "vs torch", "GFLOP/s", "% peak"]
    compiles = any(row.get("compile_s") is not None for row in report["results"])
    for column in columns + (["compile s"] if compiles else []):
        table.add_column(column, justify="right")
    for row in report["results"]:
        speedup = row["speedup_vs_torch"]
        compile_s = row.get("compile_s")
        table.add_row(
            row["what"],
            str(row["batch"]),
            row["backend"],
            f"{row['median_ms']:.3f}",
            f"{row['p90_ms']:.3f}",
            f"{row['samples_per_s']:.1f}",
            "-" if speedup is None else f"{speedup:.2f}x",
            "-" if row["gflops_per_s"] is None else f"{row['gflops_per_s']:.2f}",
            "-" if row["peak_fraction"] is None else f"{100 * row['peak_fraction']:.1f}",
            *([] if not compiles else ["-" if compile_s is None else f"{compile_s:.1f}"]),
        )
    out.print(table)
    if compiles:
        out.print("compile s: first calls at the cell's batch sizes, before and outside the timed rounds")
    for name, reason in report.get("unavailable", {}).items():
        out.print(f"{name}: unavailable ({reason})", highlight=False)
    if "resflow" in report:
        search = report["resflow"].get("search") or {}
        out.print(
            f"resflow baseline: tol {report['resflow']['tol']:.1e}"
            + (
                f", round trip {search['roundtrip']:.2e} vs ours {search['ours_roundtrip']:.2e}"
                if search
                else " (given)"
            )
        )


@app.command(cls=_Command)
@handle_errors
def quickstart(
    out_dir: Path = typer.Option(Path("acf-quickstart"), "--out", help="Where the artifact and outputs go."),
    backend: str = _backend_option("Backend for check, sample and score."),
    n: int = typer.Option(512, help="Inputs for the parity check."),
) -> None:
    """The whole path on the shipped digits-acf-l2: export, check, sample grid, score the test split."""
    from .quickstart import run_quickstart

    with console.status("quickstart") as status:
        summary = run_quickstart(out_dir, backend, n, log=lambda msg: status.update(msg))
    table = Table(title="acf-deploy quickstart: digits-acf-l2")
    table.add_column("step")
    table.add_column("result")
    for step, result in summary["rows"]:
        table.add_row(step, result)
    out.print(table)
    if not summary["passed"]:
        from .errors import CheckFailed

        raise CheckFailed("quickstart parity check failed")


experiment_app = typer.Typer(
    no_args_is_help=True, cls=_Group, help="Experiments that test claims, with pre-registered reports."
)
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("paper", cls=_Command)
@handle_errors
def experiment_paper(
    budget: str = typer.Option(
        "small",
        metavar="small|full",
        help="small (CI smoke test, about a minute) | full (35 runs, 30 min with --jobs 2 on 2 cores).",
    ),
    out_dir: Path = typer.Option(Path("experiments/paper"), "--out", help="Run directory; rerun to resume."),
    seeds: int | None = typer.Option(None, help="Seeds per preset (budget default: full 5, small 2)."),
    threads: int = typer.Option(1, help="torch threads per run."),
    jobs: int = typer.Option(1, help="Runs trained side by side in worker processes; 2 on an idle 2-core machine."),
    json_out: bool = typer.Option(False, "--json", help="The report path and verdicts as JSON."),
) -> None:
    """Test the ACF paper's four claims on digits: 6 presets, one budget, paired seeds; writes REPORT.md."""
    from .experiment import run_experiment

    with progress() as bar:
        tasks: dict[str, Any] = {}

        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind == "start":
                tasks["runs"] = bar.add_task(f"experiment ({info['budget']})", total=info["total"], info="")
            elif kind == "run":
                label = f"  {info['preset']} seed {info['seed']}"
                if "epochs" in tasks:
                    bar.update(tasks["epochs"], description=label, total=info["epochs"], completed=0, info="")
                else:
                    tasks["epochs"] = bar.add_task(label, total=info["epochs"], info="")
            elif kind == "epoch":
                bar.update(tasks["epochs"], completed=info["epoch"], info=f"bits/dim {info['bpd']:.3f}")
            elif kind == "run_done":
                bar.update(tasks["runs"], completed=info["index"], info=f"last {info['heldout_bpd']:.3f}")

        summary = run_experiment(budget, out_dir, seeds=seeds, threads=threads, on_event=on_event, jobs=jobs)
    if json_out:
        print_json({"report": str(summary["report"]), "verdicts": summary["verdicts"]})
        return
    table = Table(title=f"ACF claims on digits ({budget} budget)")
    table.add_column("claim")
    table.add_column("verdict")
    for claim, verdict in summary["verdicts"].items():
        table.add_row(claim, verdict)
    out.print(table)
    out.print(f"report: {summary['report']}")


if __name__ == "__main__":  # pragma: no cover
    app()
