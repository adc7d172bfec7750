"""Training: unbiased roulette log-det for images, exact log-det for the toy (docs/guarantees.md §4).

The progress bar shows the loss and an unbiased bits/dim estimate (the roulette value, never
the Neumann gradient surrogate). EMA weights are what gets checkpointed, evaluated and shipped.
Every epoch ends with an atomic checkpoint, so ``--resume`` continues where a run stopped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_state, read_tensors, save_checkpoint, save_tensors
from .data import to_model_space, training_data
from .errors import BadInput
from .fileio import write_json
from .flows.blocks import LogdetSpec
from .flows.flow import Flow
from .flows.layers import LogitTransform, bits_per_dim
from .flows.presets import build_flow

STATE_WEIGHTS = "train_state.safetensors"
STATE_META = "train_state.json"


def training_spec(config: dict[str, Any]) -> LogdetSpec:
    return LogdetSpec(mode="exact") if config["host"] == "toy" else LogdetSpec(mode="roulette")


def _ema_update(ema: dict[str, torch.Tensor], flow: Flow, decay: float) -> None:
    params = {name for name, _ in flow.named_parameters()}  # once per step, not once per tensor
    with torch.no_grad():
        for name, value in flow.state_dict().items():
            if value.is_floating_point() and name in params:
                ema[name].mul_(decay).add_(value, alpha=1 - decay)
            else:
                ema[name].copy_(value)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = opt.state_dict()
    tensors = {
        f"optim.{idx}.{key}": (value if torch.is_tensor(value) else torch.tensor(value))
        for idx, entry in state["state"].items()
        for key, value in entry.items()
    }
    return tensors, state["param_groups"]


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def _config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys that differ between two configs, ignoring ``train.epochs`` (a resumed run may extend it)."""
    keys = sorted((set(old) | set(new)) - {"train"})
    changed = [k for k in keys if old.get(k) != new.get(k)]
    old_hp, new_hp = old.get("train", {}), new.get("train", {})
    changed += [
        f"train.{k}" for k in sorted(set(old_hp) | set(new_hp)) if k != "epochs" and old_hp.get(k) != new_hp.get(k)
    ]
    return changed


@torch.no_grad()
def diagonal_gaussian_bpd(train: np.ndarray, test: np.ndarray, config: dict[str, Any], seed: int = 0) -> float:
    """Held-out score of the simplest baseline: a diagonal Gaussian fitted by maximum likelihood in logit space.

    The same pipeline as :func:`evaluate_bpd`: seeded uniform dequantisation (the test set's noise is
    drawn exactly as there), the logit preprocessing with its log-det, then bits/dim of the discrete
    levels (or the mean negative log-likelihood in nats for toy data, which have no preprocessing). A
    trained flow must beat it.
    """
    logit = LogitTransform(config["logit_alpha"]) if config["logit_alpha"] is not None else None

    def model_space(data: np.ndarray, generator: torch.Generator, batch_size: int = 128):
        for start in range(0, len(data), batch_size):
            x = to_model_space(data[start : start + batch_size], config, generator).double()
            y, logdet = logit(x) if logit is not None else (x, x.new_zeros(len(x)))
            yield y.flatten(1), logdet

    ys = torch.cat([y for y, _ in model_space(train, torch.Generator().manual_seed(seed))])
    mean, var = ys.mean(0), ys.var(0, unbiased=False).clamp_min(1e-12)
    total, count = 0.0, 0
    for y, logdet in model_space(test, torch.Generator().manual_seed(seed)):
        log_prob = (-0.5 * (y - mean).square() / var - 0.5 * torch.log(2 * math.pi * var)).sum(1) + logdet
        value = bits_per_dim(log_prob, y.shape[1], config["n_levels"]) if config["n_levels"] else -log_prob
        total += float(value.sum())
        count += len(y)
    return total / count


@torch.no_grad()
def evaluate_bpd(
    flow: Flow,
    data: np.ndarray,
    config: dict[str, Any],
    batch_size: int = 128,
    seed: int = 0,
    perturb: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Held-out bits/dim (images) or mean negative log-likelihood in nats (toy), exact log-det.

    ``perturb`` (e.g. added noise) is applied to each dequantised batch before it is scored.
    """
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        x = to_model_space(data[start : start + batch_size], config, generator)
        if perturb is not None:
            x = perturb(x)
        log_prob = flow.log_prob(x, LogdetSpec(mode="exact")).double()
        value = flow.bits_per_dim(log_prob) if config["n_levels"] else -log_prob
        total += float(value.sum())
        count += len(x)
    return total / count


def _resume(
    flow: Flow, opt: torch.optim.Optimizer, config: dict[str, Any], out_dir: Path
) -> tuple[dict[str, torch.Tensor], int, list, float]:
    """Weights, optimizer state and EMA from the last epoch checkpoint: ``(ema, next epoch, history, seconds)``."""
    meta_path = out_dir / STATE_META
    if not meta_path.is_file():
        raise BadInput(f"--resume: {meta_path} is missing; start without --resume")
    meta = json.loads(meta_path.read_text())
    changed = _config_changes(meta["config"], config)
    if changed:
        raise BadInput(
            f"--resume: {out_dir} was trained with a different config ({', '.join(changed)}); use a new --out"
        )
    tensors = read_tensors(out_dir / STATE_WEIGHTS)
    load_state(flow, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, out_dir / STATE_WEIGHTS)
    _restore_optimizer(opt, tensors, meta["param_groups"])
    ema = {k[4:]: v.clone() for k, v in tensors.items() if k.startswith("ema.")}
    return ema, meta["epoch"] + 1, meta["history"], meta["seconds"]


def _step(
    flow: Flow,
    opt: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor],
    x: torch.Tensor,
    config: dict[str, Any],
    spec: LogdetSpec,
    step: int,
) -> tuple[float, float]:
    """One optimiser step (warm-up, clipped gradients, EMA): ``(loss, unbiased bits/dim or nll estimate)``."""
    hp = config["train"]
    for group in opt.param_groups:
        group["lr"] = hp["lr"] * min(1.0, (step + 1) / hp["warmup_steps"])
    out = flow(x, spec)
    estimate = flow.bits_per_dim(out.log_prob) if config["n_levels"] else -out.log_prob
    loss = estimate.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(flow.parameters(), hp["grad_clip"])
    opt.step()
    _ema_update(ema, flow, hp["ema_decay"])
    return float(loss.detach()), float(estimate.detach().mean())


def train(
    config: dict[str, Any],
    out_dir: str | Path,
    seed: int = 0,
    resume: bool = False,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Flow, dict[str, Any]]:
    """Train a flow from ``config`` into ``out_dir``; returns the EMA flow (eval mode) and its metrics."""
    out_dir = Path(out_dir)
    hp = config["train"]
    torch.manual_seed(seed)
    train_data, test_data = training_data(config, seed=seed)
    flow = build_flow(config)
    opt = torch.optim.Adam(flow.parameters(), lr=hp["lr"])
    steps_per_epoch = math.ceil(len(train_data) / hp["batch_size"])
    start_epoch, history, elapsed = 0, [], 0.0
    if resume:
        ema, start_epoch, history, elapsed = _resume(flow, opt, config, out_dir)
    else:
        init = torch.as_tensor(train_data[np.random.default_rng(seed).permutation(len(train_data))[:512]])
        flow.initialize(to_model_space(init.numpy(), config, torch.Generator().manual_seed(seed)))
        ema = {k: v.detach().clone() for k, v in flow.state_dict().items()}

    spec = training_spec(config)
    for epoch in range(start_epoch, hp["epochs"]):
        flow.train()
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        torch.manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(train_data), generator=generator).numpy()
        sums = {"loss": 0.0, "bpd": 0.0}
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            batch = train_data[order[i * hp["batch_size"] : (i + 1) * hp["batch_size"]]]
            loss, estimate = _step(flow, opt, ema, to_model_space(batch, config, generator), config, spec, step)
            sums["loss"] += loss
            sums["bpd"] += estimate
            if on_step:
                on_step({"epoch": epoch, "step": i + 1, "steps": steps_per_epoch, "loss": loss})
        elapsed += time.perf_counter() - started
        record = {"epoch": epoch, "train_estimate": sums["bpd"] / steps_per_epoch, "seconds": elapsed}
        history.append(record)
        _save_epoch(flow, ema, opt, config, out_dir, epoch, history, elapsed)
        if on_epoch:
            on_epoch(epoch, record)

    flow.load_state_dict(ema)
    flow.eval()
    metrics = {"train_seconds": elapsed, "epochs": hp["epochs"], "seed": seed, "history": history}
    return flow, metrics


def _save_epoch(flow, ema, opt, config, out_dir: Path, epoch: int, history: list, elapsed: float) -> None:
    """Atomic per-epoch checkpoint: EMA weights as the model, raw weights + optimizer for ``--resume``."""
    tensors, groups = _optimizer_tensors(opt)
    tensors.update({f"model.{k}": v for k, v in flow.state_dict().items()})
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    save_tensors(tensors, out_dir / STATE_WEIGHTS)
    write_json(
        out_dir / STATE_META,
        {"config": config, "epoch": epoch, "history": history, "seconds": elapsed, "param_groups": groups},
    )
    ema_flow = build_flow(config)
    ema_flow.load_state_dict(ema)
    save_checkpoint(ema_flow, config, out_dir, {"epochs_done": epoch + 1, "train_seconds": elapsed})
