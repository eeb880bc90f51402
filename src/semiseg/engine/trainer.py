"""The one training loop: optimizers, poly LR, AMP, clipping, DDP, validation, checkpoints, logging."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semiseg.config import TrainConfig
from semiseg.data.normalization import set_channels_last
from semiseg.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from semiseg.engine.distributed import DistInfo, all_ranks_true, all_reduce_mean, broadcast_object
from semiseg.engine.task import Optimized, StepContext, TrainingTask
from semiseg.errors import ConfigError, TrainingDiverged
from semiseg.layout import StageLayout
from semiseg.models.factory import param_group_of, unwrap

Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass
class FitResult:
    best_metric: float | None
    best_step: int | None
    steps: int
    seconds: float


def build_optimizer(net: nn.Module, spec: Optimized, train: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """Two groups: encoder at ``lr``, decoder + classifier at ``lr × head_lr_mult``."""
    mult = spec.head_lr_mult if spec.head_lr_mult is not None else train.head_lr_mult
    enc = [p for n, p in unwrap(net).named_parameters() if p.requires_grad and param_group_of(n) == "encoder"]
    rest = [p for n, p in unwrap(net).named_parameters() if p.requires_grad and param_group_of(n) != "encoder"]
    groups = [{"params": enc, "lr": lr, "base_lr": lr}, {"params": rest, "lr": lr * mult, "base_lr": lr * mult}]
    groups = [g for g in groups if g["params"]]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay)
    cls = torch.optim.Adam if train.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=lr, weight_decay=train.weight_decay)


def poly_factor(step: int, total: int, power: float) -> float:
    return max(0.0, 1.0 - step / total) ** power


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: step 0 trains at ``1/warmup_steps`` of the rate, step ``warmup_steps - 1`` at all of it
    (a pretrained encoder is not shaken by the large early gradients of a random decoder)."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


def resolve_channels_last(setting: bool | str, device: torch.device) -> bool:
    """``auto``: channels-last everywhere. Measured on this project's 2-core CPU (Lite0 Unet, 128 px, batch 8,
    fwd + bwd + AdamW) and the layout PyTorch recommends for convolutions under AMP on CUDA;
    ``semiseg bench throughput`` measures both layouts on the device at hand."""
    return True if setting == "auto" else bool(setting)


class Trainer:
    """Runs ``task`` for ``train.steps`` steps in ``stage_dir``; resumes from ``checkpoints/last.pt``."""

    def __init__(self, task: TrainingTask, train: TrainConfig, stage_dir: Path, *, device: torch.device,
                 dist: DistInfo | None = None, evaluate: Evaluate | None = None, val_metric: str = "dice",
                 steps: int | None = None, console: Any = None) -> None:
        self.task, self.train, self.stage_dir, self.device = task, train, Path(stage_dir), device
        self.dist = dist or DistInfo()
        self.evaluate, self.val_metric = evaluate, val_metric
        self.total = steps if steps is not None else train.steps
        self.console = console
        self.layout = StageLayout(self.stage_dir)
        self.ckpt_dir = self.layout.checkpoints
        self.metrics_path = self.layout.metrics
        self.amp_dtype = self._amp_dtype()
        self._wrap_for_ddp()
        lr_scale = self.dist.world_size if train.lr_scaling == "linear" else 1
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedules: dict[str, str] = {}
        for spec in task.optimized:
            lr = (spec.lr if spec.lr is not None else train.lr) * lr_scale
            self.optimizers[spec.net] = build_optimizer(task.nets[spec.net], spec, train, lr)
            self.schedules[spec.net] = spec.schedule or train.lr_schedule
        use_scaler = self.amp_dtype == torch.float16 and device.type == "cuda"
        self.scalers = {n: torch.amp.GradScaler(device.type, enabled=use_scaler) for n in self.optimizers}
        self.step = 0
        self.best: dict[str, Any] = {"metric": None, "step": None}
        self.best_extra: dict[str, dict[str, Any]] = {}  # per extra eval net (TrainingTask.extra_eval_nets)
        self._saved_step: int | None = None  # step of the last.pt on disk (named when training diverges)
        self._tb = None

    # -- setup -------------------------------------------------------------------------------------
    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.train.amp
        if amp == "auto":
            return torch.float16 if self.device.type == "cuda" else None
        return {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]

    def _wrap_for_ddp(self) -> None:
        channels_last = resolve_channels_last(self.train.channels_last, self.device)
        for name, net in self.task.nets.items():
            self.task.nets[name] = set_channels_last(net.to(self.device), channels_last)
        if not self.dist.enabled:
            return
        if self.train.sync_bn and self.device.type != "cuda":
            raise ConfigError("train.sync_bn: PyTorch's SyncBatchNorm runs on CUDA only; turn it off on CPU")
        for spec in self.task.optimized:
            net = self.task.nets[spec.net]
            if self.train.sync_bn:
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.task.nets[spec.net] = nn.parallel.DistributedDataParallel(net, device_ids=ids)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- one optimisation step (called by the task, possibly several times per step) ----------------
    def optimize(self, name: str, loss: torch.Tensor) -> None:
        opt, scaler = self.optimizers[name], self.scalers[name]
        opt.zero_grad(set_to_none=True)
        # never step on a NaN/inf loss: the weights would follow. Every rank decides together (a rank that raised
        # alone would leave the others waiting in the gradient all-reduce); an fp16 GradScaler skips such steps itself
        if not scaler.is_enabled() and not all_ranks_true(bool(torch.isfinite(loss.detach()).all()), self.device):
            self._diverged(f"the loss of {name!r} is {float(loss.detach().float().mean())}", name)
        scaler.scale(loss).backward()
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if self.train.grad_clip is not None:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, self.train.grad_clip)
        elif not scaler.is_enabled():
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        else:
            norm = None
        # with an fp16 GradScaler, non-finite gradients are expected now and then: the scaler skips the step
        # and lowers its scale. Without one they mean the run has diverged.
        if norm is not None and not scaler.is_enabled() and not math.isfinite(float(norm)):
            self._diverged(f"the gradient norm of {name!r} is {float(norm)}", name)
        scaler.step(opt)
        scaler.update()

    def _diverged(self, what: str, name: str) -> None:
        lr = self.optimizers[name].param_groups[0]["lr"]
        last = (f"; the last good checkpoint is {self.layout.last} (step {self._saved_step}), but a run's "
                "config is fixed: train a new run (--set name=...) with the changed setting"
                if self._saved_step is not None else "")
        raise TrainingDiverged(
            f"stage {self.stage_dir.name}: training diverged at step {self.step + 1}: {what}. Remedies: a lower "
            f"train.lr (now {lr:g}), train.grad_clip (e.g. 1.0), mixed precision off (train.amp=none){last}")

    def _check_finite_weights(self, net: nn.Module, what: str) -> None:
        bad = [k for k, v in unwrap(net).state_dict().items()
               if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            self._diverged(f"{what} has non-finite weights ({', '.join(bad[:3])}"
                           f"{', ...' if len(bad) > 3 else ''})", next(iter(self.optimizers)))

    def _set_lr(self) -> float:
        lr0 = 0.0
        warm = warmup_factor(self.step, round(self.train.warmup * self.total))
        for name, opt in self.optimizers.items():
            f = poly_factor(self.step, self.total, self.train.poly_power) if self.schedules[name] == "poly" else 1.0
            f *= warm
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            lr0 = lr0 or opt.param_groups[0]["lr"]
        return lr0

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "total": self.total, "best": self.best, "best_extra": self.best_extra,
            "nets": {n: unwrap(m).state_dict() for n, m in self.task.nets.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "scalers": {n: s.state_dict() for n, s in self.scalers.items()},
            "loaders": {n: ld.state_dict() for n, ld in self.task.loaders.items()},
            "task": self.task.state_dict(), "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.best = state["step"], state["best"]
        self.best_extra = state.get("best_extra", {})
        for n, sd in state["nets"].items():
            unwrap(self.task.nets[n]).load_state_dict(sd)
        for n, sd in state["optimizers"].items():
            self.optimizers[n].load_state_dict(sd)
        for n, sd in state["scalers"].items():
            self.scalers[n].load_state_dict(sd)
        for n, sd in state["loaders"].items():
            self.task.loaders[n].load_state_dict(sd)
        self.task.load_state_dict(state["task"])
        set_rng_state(state["rng"])

    def _save(self, name: str, state: dict[str, Any]) -> None:
        if self.dist.is_main:
            save_checkpoint(self.ckpt_dir / name, state)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, record["step"])

    def _truncate_metrics(self) -> None:
        """After a resume, drop log lines written after the checkpoint so that the log equals an unbroken run."""
        if not (self.dist.is_main and self.metrics_path.exists()):
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= self.step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    # -- the loop ------------------------------------------------------------------------------------
    def _validate(self) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        record = self._validate_net(self.task.eval_net(), None)
        for name, net in self.task.extra_eval_nets().items():
            record.update(self._validate_net(net, name))
        return record

    def _validate_net(self, net: nn.Module, extra: str | None) -> dict[str, float]:
        """Validate ``net``; keep it as ``best.pt`` (``best-<extra>.pt`` for an extra net) when it improves."""
        was_training = net.training
        net.eval()
        scores = broadcast_object(self.evaluate(net) if self.dist.is_main else None)
        net.train(was_training)
        best = self.best if extra is None else self.best_extra.get(extra, {"metric": None, "step": None})
        metric = scores.get(self.val_metric)  # type: ignore[union-attr]
        if metric is not None and math.isfinite(metric) and (best["metric"] is None or metric > best["metric"]):
            self._check_finite_weights(net, "the validated network")  # NaN weights are never 'best'
            if extra is None:
                self.best = {"metric": metric, "step": self.step}
            else:
                self.best_extra[extra] = {"metric": metric, "step": self.step}
            self._save(self.layout.best(extra).name,
                       {"net": unwrap(net).state_dict(), "step": self.step, "metric": metric,
                        "val_metric": self.val_metric})
        prefix = "val" if extra is None else f"val_{extra}"
        return {f"{prefix}/{k}": v for k, v in scores.items()}  # type: ignore[union-attr]

    def run_step(self, batches: dict[str, Any]) -> dict[str, float]:
        """The loop body: the task's step on ``batches``, then its hooks (their values join the step's log);
        the step counter advances, and when the first loader finished an epoch the epoch-end calls run."""
        ctx = StepContext(self.step, self.device, self.autocast, self.optimize, self.total)
        losses = self.task.train_step(batches, ctx)
        for hook in self.task.hooks:
            losses.update(hook.after_step(ctx.step, batches))
        self.step += 1
        first = next(iter(self.task.loaders.values()))
        if first.batch == first.batches_per_epoch():
            self.task.on_epoch_end(first.epoch)
            for hook in self.task.hooks:
                hook.on_epoch_end(first.epoch)
        return losses

    def fit(self) -> FitResult:
        last = self.layout.last
        if last.exists():
            self.load_state_dict(load_checkpoint(last, self.device, finite=True))
            self._saved_step = self.step
            self._truncate_metrics()
        elif self.dist.is_main:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            self.metrics_path.write_text("")
        if self.train.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.layout.tensorboard))
        for net in self.task.nets.values():
            net.train()
        start, t0 = self.step, time.time()
        progress = self._progress()
        with progress or contextlib.nullcontext():
            bar = progress.add_task(self.stage_dir.name, total=self.total, completed=self.step) if progress else None
            while self.step < self.total:
                lr = self._set_lr()
                batches = {n: _to_device(next(ld), self.device) for n, ld in self.task.loaders.items()}
                losses = self.run_step(batches)
                record: dict[str, Any] = {}
                if self.step % 10 == 0 or self.step == self.total:
                    record.update(all_reduce_mean({f"train/{k}": float(v) for k, v in losses.items()}, self.device))
                    record["lr"] = lr
                if self.step % self.train.eval_every == 0 or self.step == self.total:
                    record.update(self._validate())
                if record:
                    self._log({"step": self.step, **record})
                if self.step % self.train.checkpoint_every == 0 or self.step == self.total:
                    for net_name, net in self.task.nets.items():  # a diverged state must not replace a good one
                        self._check_finite_weights(net, f"network {net_name!r}")
                    self._save(self.layout.last.name, self.state_dict())
                    self._saved_step = self.step
                if progress is not None:
                    progress.update(bar, completed=self.step)
        if self._tb is not None:
            self._tb.close()
        for loader in self.task.loaders.values():  # the stage is over: its worker processes go now, not at exit
            loader.close()
        return FitResult(self.best["metric"], self.best["step"], self.step - start, time.time() - t0)

    def _progress(self) -> Any:
        if not (self.train.progress and self.dist.is_main):
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
