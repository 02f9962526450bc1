"""The training loop: gradient accumulation, AMP, clipping, eval, checkpoints, exact resume."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..config.validate import batch_split_problems
from ..core.errors import LlmctlError
from ..runtime import distributed as dist_utils
from ..runtime.checkpoint import save_checkpoint
from ..runtime.device import Precision, check_training_fits
from ..runtime.distributed import DistEnv
from ..runtime.host_memory import keep_freed_memory
from .data import TrainingData, open_training_data
from .finetune import StartWeights, load_start_weights
from .flops import mfu, peak_flops
from .metrics import METRICS_FILE, Console, MetricsFile
from .optim import LRSchedule, build_optimizer, set_lr
from .parallel import Parallel, local_value
from .prefetch import Prefetcher
from .resume import (
    check_same_architecture,
    read_resume_checkpoint,
    read_training_state,
    resume_target,
)
from .run_folder import (
    BEST,
    LATEST,
    RunFolderLock,
    check_fresh_start,
    prepare_run_dir,
    run_dir,
)
from .signals import StopRequest
from .state import capture_rng, restore_rng


class TrainingDiverged(LlmctlError):
    """The loss (or, without fp16's scaler, the gradient norm) stopped being finite; that
    step was not applied and nothing was saved from it."""


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    run_dir: Path
    stopped_by: str | None = None  # signal name when interrupted
    last_loss: float | None = None
    best_val: float | None = None
    resumed_from: Path | None = None


class Trainer:
    """One training run of `run`; `fit()` trains to max_iters (or a stop signal)."""

    def __init__(self, run: RunConfig, *, env: DistEnv | None = None, verbose: bool = True):
        self.run, self.cfg = run, run.train
        self.env = env or dist_utils.env_from_torchrun()
        self._check_batch_split()
        self.precision = Precision.from_names(self.cfg.device, self.cfg.dtype,
                                              self.env.local_rank)
        self.device = self.precision.device
        self.parallel = Parallel(self.env, self.device, fsdp=self.cfg.fsdp)
        self.grad_accum = run.grad_accum_steps(self.env.world_size)
        self.run_dir = run_dir(run)
        self.verbose = verbose and self.env.is_main
        self.console = Console(self.cfg.max_iters, 0, enabled=self.verbose)
        self.step = 0
        self.best_val: float | None = None
        self.wandb_id: str | None = None
        self.elapsed = 0.0  # training seconds before this process (resume)
        self.resumed_from: Path | None = None
        self.lock = RunFolderLock(self.run_dir)
        self.start = StartWeights(None, None, None)  # init_from / LoRA bookkeeping
        self._mtp_losses: list[float] = []  # the last step's loss per MTP depth

    # ------------------------------------------------------------------ setup

    def _check_batch_split(self) -> None:
        problems = batch_split_problems(self.run, self.env.world_size)
        if problems:
            raise ConfigError(problems)

    def _setup(self) -> None:
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:  # steps reuse their freed host memory instead of faulting it in again
            keep_freed_memory()
        dist_utils.init(self.env, self.device)
        check_training_fits(self.run, self.device, self.env.world_size)
        self.data: TrainingData = open_training_data(self.run, self.env)
        self._claim_run_dir()
        ckpt = self._resume_target()
        self.metrics = MetricsFile(self.run_dir / METRICS_FILE)
        info = None
        if ckpt is not None:
            info = read_resume_checkpoint(ckpt)
            check_same_architecture(info, self.run.model)

        from ..model import LLM

        seed = self.cfg.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # every rank builds the same initial weights
        self.raw_model = LLM(self.run.model, act_recomp=self.cfg.act_recomp)
        if ckpt is not None and not self.cfg.lora:
            from ..runtime.checkpoint import load_weights

            load_weights(ckpt, self.raw_model)
            self.start = StartWeights(info.raw.get("init_from"), None, None)
        elif ckpt is not None or self.cfg.init_from:
            self.start = load_start_weights(self.raw_model, self.cfg, self.data.dataset,
                                            ckpt, info)
        self.raw_model.to(self.device)
        # wrap first: FSDP swaps in sharded parameters, which the optimizer must hold
        compile_model = (self.device.type == "cuda" if self.cfg.compile is None
                         else self.cfg.compile)  # default: compile where it helps (CUDA)
        self.model, self.eval_model = self.parallel.wrap(self.raw_model, compile_model)
        self.optimizer = build_optimizer(self.raw_model, self.cfg, self.device)
        self.schedule = LRSchedule.from_config(self.cfg)
        if self.env.rank:
            torch.manual_seed(seed + self.env.rank)  # distinct dropout masks per rank

        self.train_sampler = self.data.sampler("train", seed=seed)
        trainer_state: dict[str, Any] = {}
        if ckpt is not None:
            trainer_state = self._restore(ckpt, info)  # RNG last: nothing may draw after it
        self.wandb = None
        if self.cfg.wandb_log and self.env.is_main:
            from ..config.schema import unix_time_name
            from .wandb_run import WandbRun

            run_id = trainer_state.get("wandb_run_id")
            # Unset name: the reference's unix time for a new run; a resumed run keeps its own.
            name = self.cfg.wandb_run_name or (None if run_id else unix_time_name())
            self.wandb = WandbRun(project=self.cfg.wandb_project, name=name,
                                  config=self.run.to_dict(), run_dir=self.run_dir,
                                  run_id=run_id)
            self.wandb_id = self.wandb.id
        self.flops_per_token = _flops_per_token(self.run)
        self.peak = peak_flops(self.device, self.cfg.peak_flops)

    def _claim_run_dir(self) -> None:
        """Rank 0 creates the run folder and locks it for the whole run (one writer per
        folder); every rank learns whether that worked, so all stop with the same message."""
        error = None
        if self.env.is_main:
            try:
                prepare_run_dir(self.run_dir)
                self.lock.acquire()
            except LlmctlError as err:
                error = str(err)
        error = dist_utils.broadcast_json(error)
        if error:
            raise LlmctlError(error)

    def _resume_target(self) -> Path | None:
        """Rank 0 finds the checkpoint, or vets the folder for a fresh start; others follow."""
        found, error = None, None
        if self.env.is_main:
            try:
                found = resume_target(self.cfg.resume, self.run_dir)
                if found is None:
                    check_fresh_start(self.run_dir, set_aside_metrics=True)
            except LlmctlError as err:
                error = str(err)
        found, error = dist_utils.broadcast_json((found and str(found), error))
        if error:
            raise LlmctlError(error)
        return Path(found) if found else None

    def _restore(self, ckpt: Path, info: Any) -> dict[str, Any]:
        opt_state, state = read_training_state(ckpt, self.raw_model, self.optimizer)
        try:
            self.parallel.load_optimizer_state(self.raw_model, self.optimizer, opt_state)
            self.train_sampler.load_state_dict(state["sampler"])
            self.precision.load_scaler_state(state.get("scaler") or {})
            rngs = state["rng"]
        except (KeyError, ValueError, TypeError, RuntimeError, AssertionError) as err:
            raise LlmctlError(f"cannot resume from {ckpt}: its optimizer / trainer state does "
                              f"not fit this run ({err})") from None
        saved_batch = info.run.train.total_batch_size
        if saved_batch != self.cfg.total_batch_size and self.verbose:
            # the sampler counts global samples, so only the total batch size shapes the order
            self.console.info(f"note: total_batch_size changed from {saved_batch} to "
                              f"{self.cfg.total_batch_size}; the data order differs from an "
                              "uninterrupted run")
        if self.env.rank < len(rngs):
            restore_rng(rngs[self.env.rank])
        self.step = info.step
        self.best_val = state.get("best_val")
        self.elapsed = float(state.get("elapsed", 0.0))
        self.wandb_id = state.get("wandb_run_id")
        self.resumed_from = ckpt
        if self.env.is_main:
            self.metrics.truncate_after(self.step)  # drop records of the lost steps
        return state

    # ------------------------------------------------------------------ checkpoints

    def _trainer_state(self, sampler_state: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_val": self.best_val,
            "rng": dist_utils.all_gather_json(capture_rng()),
            "sampler": sampler_state,
            "scaler": self.precision.scaler_state(),
            "world_size": self.env.world_size,
            "elapsed": self.elapsed + self._clock(),
            "wandb_run_id": self.wandb_id,
        }

    def _save(self, name: str, sampler_state: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Write checkpoint `name` from rank 0; every rank learns whether it worked."""
        # collectives: every rank takes part, rank 0 receives the full state
        state = self._trainer_state(sampler_state)
        weights = self.parallel.model_state(self.raw_model)
        adapter = self.start.adapter_files(self.raw_model, self.cfg)
        if adapter:
            weights = None  # an adapter checkpoint: the base stays where it is
        optimizer_state = self.parallel.optimizer_state(self.raw_model, self.optimizer)
        error = None
        if self.env.is_main:
            try:
                save_checkpoint(self.run_dir / name, state_dict=weights, run=self.run,
                                step=self.step, metrics=metrics,
                                tokenizer=self.data.tokenizer_spec,
                                files=self.data.tokenizer_files,
                                optimizer_state=optimizer_state, trainer_state=state,
                                extra=self.start.config_record(), **adapter)
            except LlmctlError as err:
                error = str(err)
        error = dist_utils.broadcast_json(error)
        if error:
            raise LlmctlError(error)
        if self.verbose:
            self.console.info(f"saved {name} checkpoint at step {self.step}: "
                              f"{self.run_dir / name}")

    # ------------------------------------------------------------------ the loop

    def _clock(self) -> float:
        return time.perf_counter() - self._t0

    def fit(self) -> TrainResult:
        try:
            self._setup()
            return self._fit()
        finally:
            dist_utils.shutdown()
            self.lock.release()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        self._t0 = time.perf_counter()
        self._banner()
        result = TrainResult(step=self.step, run_dir=self.run_dir,
                             resumed_from=self.resumed_from, best_val=self.best_val)
        feed = Prefetcher(self.train_sampler, self.device)
        self.console.start_step = self.step
        last_metrics: dict[str, Any] = {}
        exit_code = 1
        try:
            with StopRequest() as stop, self.console, feed:
                window = _Window(self._clock(), self.step)
                while self.step < cfg.max_iters:
                    loss, aux, stop_votes = self._train_step(feed, stop)
                    self.step += 1
                    last = self.step == cfg.max_iters
                    result.last_loss = loss
                    self.console.advance(self.step)
                    if self.step % cfg.log_interval == 0 or last:
                        last_metrics.update(self._log(loss, aux, window))
                        window = _Window(self._clock(), self.step)
                    if cfg.eval and (self.step % cfg.eval_interval == 0 or last):
                        t = time.perf_counter()
                        last_metrics.update(self._evaluate(feed.state_dict()))
                        window.paused += time.perf_counter() - t
                    if stop_votes:
                        result.stopped_by = stop.requested or "a signal on another rank"
                        self._save(LATEST, feed.state_dict(), last_metrics)
                        break
                    if cfg.save_model and (self.step % cfg.ckpt_interval == 0 or last):
                        t = time.perf_counter()
                        self._save(LATEST, feed.state_dict(), last_metrics)
                        window.paused += time.perf_counter() - t
            exit_code = 0
        finally:
            if self.wandb is not None:
                self.wandb.finish(exit_code)
        if cfg.eval and self.env.is_main and result.stopped_by is None:
            self._plot()
        result.step, result.best_val = self.step, self.best_val
        return result

    def _plot(self) -> None:
        """The loss-curve PNG; failing to draw it is reported, not fatal (training is done)."""
        from .plot import PLOT_FILE, plot_loss_curve

        try:
            path = plot_loss_curve(self.metrics.read(), self.run_dir / PLOT_FILE,
                                   title=self.cfg.file_name)
        except (OSError, ValueError, LlmctlError) as err:  # LlmctlError: not a regular file
            self.console.info(f"warning: could not write the loss curve: {err}")
            return
        if self.verbose:
            self.console.info(f"loss curve: {path}")

    def _train_step(self, feed: Prefetcher, stop: StopRequest) -> tuple[float, float, bool]:
        """One optimizer step over grad_accum micro-batches; (loss, aux loss, stop?)."""
        model, accum, scaler = self.model, self.grad_accum, self.precision.scaler
        set_lr(self.optimizer, self.schedule(self.step))
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        mtp_sum = torch.zeros(self.raw_model.config.mtp_depth, device=self.device)
        for micro in range(accum):
            x, y = feed.next()
            # gradients are all-reduced only on the last micro-step
            sync = micro == accum - 1
            with self.parallel.gradient_sync(model, sync):
                with self.precision.autocast():
                    out = model(x, targets=y)
                # keep only the scalars: the (B, T, vocab) logits must not outlive the step
                loss, aux = out.loss, out.aux_loss
                mtp = torch.stack(out.mtp_losses).detach().float() if out.mtp_losses else None
                del out
                scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float()
            aux_sum += aux.detach().float()
            if mtp is not None:
                mtp_sum[: len(mtp)] += mtp
        # one small all-reduce: mean loss, mean aux loss, and whether any rank got a signal
        flag = torch.tensor(float(stop.requested is not None), device=self.device)
        packed = dist_utils.all_reduce_(torch.cat([torch.stack([loss_sum / accum,
                                                                aux_sum / accum, flag]),
                                                   mtp_sum / accum]), "sum")
        scaler.unscale_(self.optimizer)  # a no-op without fp16
        params = self.raw_model.parameters()
        if self.cfg.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # the step's only host sync: loss, aux loss, stop votes and gradient norm together
        grad_norm = local_value(grad_norm).reshape(1).to(packed)
        loss, aux, votes, *mtp_losses, norm = torch.cat([packed, grad_norm]).tolist()
        loss, aux = loss / self.env.world_size, aux / self.env.world_size
        self._mtp_losses = [value / self.env.world_size for value in mtp_losses]
        if not (math.isfinite(loss) and (math.isfinite(norm) or scaler.is_enabled())):
            # fp16 skips steps with inf gradients itself (the scaler backs off); otherwise
            # such a step would poison the weights
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
            hints = ["a lower --learning_rate"] + (["--grad_clip 1.0"]
                                                    if self.cfg.grad_clip <= 0 else [])
            if self.precision.dtype != torch.float32:
                hints.append("--dtype float32")
            raise TrainingDiverged(f"the {what} at step {self.step + 1}; stopped without "
                                   "applying that step (the last checkpoint is intact). Try "
                                   + " or ".join(hints) + ".")
        self._grad_norm = norm
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_expert_biases()
        return loss, aux, votes > 0

    def _update_expert_biases(self) -> None:
        """Aux-free balancing: routed-token counts summed over every rank, then one bias step."""
        counts = self.raw_model.moe_load_counts()
        self._imbalance = None
        if not counts:
            return
        flat = torch.cat([c.float() for c in counts])
        dist_utils.all_reduce_(flat, "sum")
        counts = list(flat.split([len(c) for c in counts]))
        self.raw_model.update_expert_biases(counts)
        self._imbalance = counts

    # ------------------------------------------------------------------ reporting

    def _log(self, loss: float, aux: float, window: _Window) -> dict[str, Any]:
        seconds = max(self._clock() - window.start - window.paused, 1e-9)
        tokens_per_s = (self.step - window.step) * self.cfg.total_batch_size / seconds
        record: dict[str, Any] = {
            "kind": "train", "step": self.step, "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": None if self._grad_norm is None else float(self._grad_norm),
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(self.flops_per_token, tokens_per_s, self.peak, self.env.world_size),
            "memory_gb": _memory_gb(self.device),
            "tokens": self.step * self.cfg.total_batch_size,
            "time": self.elapsed + self._clock(),
        }
        if self._mtp_losses:
            record["mtp_loss"] = self._mtp_losses  # per depth: index 0 predicts 2 tokens ahead
        if self._imbalance is not None:
            record["aux_loss"] = aux
            record["imbalance"] = [float(c.max() / c.mean().clamp_min(1e-9) - 1)
                                   for c in self._imbalance]
        self._emit(record)
        return {"loss": loss}

    def _evaluate(self, sampler_state: dict[str, Any]) -> dict[str, Any]:
        from ..runtime.loss import SPLITS, estimate_loss, eval_seed

        losses = []
        for split in SPLITS:
            # fixed seeds: every evaluation sees the same batches, so they compare fairly
            sampler = self.data.sampler(split, seed=eval_seed(self.cfg.seed, split))
            losses.append(estimate_loss(self.eval_model, sampler, self.cfg.eval_iters,
                                        self.precision.autocast()))
        packed = dist_utils.all_reduce_(torch.tensor(losses, dtype=torch.float64,
                                                     device=self.device), "avg")
        train_loss, val_loss = packed.tolist()
        record = {"kind": "eval", "step": self.step, "train_loss": train_loss,
                  "val_loss": val_loss}
        self._emit(record)
        metrics = {"train_loss": train_loss, "val_loss": val_loss}
        if math.isfinite(val_loss) and (self.best_val is None or val_loss < self.best_val):
            self.best_val = val_loss
            if self.cfg.save_model:
                self._save(BEST, sampler_state, metrics)
        return metrics

    def _emit(self, record: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        self.metrics.append(record)
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        if record["kind"] == "train":
            self.console.log(record)
        else:
            self.console.info(f"eval step {record['step']}: train {record['train_loss']:.4f}"
                              f" | val {record['val_loss']:.4f}")

    def _banner(self) -> None:
        if not self.verbose:
            return
        n = sum(p.numel() for p in self.raw_model.parameters())
        head = (f"resumed from {self.resumed_from} at step {self.step}"
                if self.resumed_from else f"fine-tuning from {self.start.init['path']}"
                if self.start.init else "training from scratch")
        if self.start.tuner is not None:
            trainable = self.start.trainable_params(self.raw_model)
            self.console.info(f"LoRA rank {self.cfg.lora_rank} on {self.cfg.lora_targets}: "
                              f"{trainable:,} trainable / {n:,} total parameters "
                              f"({100 * trainable / n:.2f}%)")
        self.console.info(
            f"{head}: {n / 1e6:.2f}M parameters on {self.device} ({self.precision.name}), "
            f"{self.env.world_size} process(es), {self.cfg.total_batch_size} tokens/step = "
            f"{self.grad_accum} micro-step(s) x {self.cfg.batch_size} x "
            f"{self.run.model.block_size}{f' x {self.env.world_size}' if self.env.enabled else ''}"
            f", run folder {self.run_dir}")


@dataclass
class _Window:
    """Throughput bookkeeping between two log lines (eval / checkpoint time excluded)."""

    start: float
    step: int
    paused: float = 0.0


def _flops_per_token(run: RunConfig) -> float:
    from ..model.costs import training_flops_per_token

    return training_flops_per_token(run.model)


def _memory_gb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPU, the process's peak RSS elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (1e9 if sys.platform == "darwin" else 1e6)
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return float("nan")


def train(run: RunConfig, *, verbose: bool = True) -> TrainResult:
    """Train `run` (single process, or one rank of a torchrun job)."""
    return Trainer(run, verbose=verbose).fit()
