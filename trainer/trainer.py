"""The training loop: one epoch of steps, an evaluation, a checkpoint; repeat.

Optimisation follows the reference (docs/reference.md §5; built in trainer.build): Adam on every trainable parameter,
ExponentialLR stepped once per epoch, no gradient clipping. On CUDA the forward pass runs under
autocast (bf16, or fp16 with a gradient scaler; trainer.mixed_precision) in every stage; on the CPU
it is plain fp32.
Under torchrun the model is wrapped in DistributedDataParallel and the losses see the global
batch; only rank 0 writes checkpoints and logs.
"""
import contextlib
import json
import signal
import time
from dataclasses import dataclass, fields

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from config_keys import RESTORED_ON_RESUME, RESUME_MAY_CHANGE
from data_loader.corpus import listed
from model.loss import RowMasks
from model.metric import format_table
from parse_config import config_differences
from trainer.evaluate import flat_metrics
from trainer.state import rng_state, saved_rng_states, seed_rank, set_rng_state
from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from common.device import amp_dtype, autocast
from common.distributed import DistInfo, gather_to_main, on_main
from common.errors import ConfigError, UserError, first_line


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a checkpoint was written (Sacred marks the run INTERRUPTED)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class NonFiniteLoss(UserError, FloatingPointError):
    """The loss became NaN or infinite; the message names the step, the terms and the items."""


@dataclass(frozen=True)
class TrainerSettings:
    """What the training loop reads of a config: its ``trainer`` section and the seed."""
    epochs: int
    max_steps_per_epoch: int | None
    log_every: int
    accumulation_steps: int
    max_skipped_steps: int
    mixed_precision: str
    compile: bool
    monitor: str            # a metric name, checked before training (trainer.build.check_training), or "off"
    save_period: int
    seed: int               # seeds a rank that a resumed run has beyond the checkpoint's
    config: dict            # the run's whole config, saved in every checkpoint

    @classmethod
    def of(cls, config):
        """The settings of a resolved config: each field but the last two is its ``trainer`` key of that name."""
        section = {f.name: config["trainer"][f.name] for f in fields(cls) if f.name not in ("seed", "config")}
        return cls(**section, seed=config["seed"], config=config)


def check_resumable(saved_config, config, path):
    """Refuse to resume ``path`` (whose config is ``saved_config``) under a config that differs
    in a key that a resumed run may not change (config_keys.py says which)."""
    for key, saved, now in config_differences(saved_config, config, ignore=RESUME_MAY_CHANGE):
        why = ("a resumed run continues the saved optimizer and schedule" if key in RESTORED_ON_RESUME
               else "a resumed run continues the same experiment")
        raise ConfigError(f"{path}: config key '{key}' = {json.dumps(now)} differs from the checkpoint's "
                          f"{json.dumps(saved)}; {why}, so keep it, or start a new run")


def check_accumulation(parts, local_batch):
    """``trainer.accumulation_steps`` must cut each process's batch of ``local_batch`` items evenly."""
    if local_batch % parts:
        raise ConfigError(f"config key 'trainer.accumulation_steps' = {parts} does not divide the "
                          f"per-process batch of {local_batch}")


def training_forward(model, device, world_size, compile):
    """What training calls: ``model`` in DistributedDataParallel under several processes, compiled
    when asked; state dicts and evaluation use the plain module."""
    forward = model
    if world_size > 1:
        forward = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(forward) if compile else forward


class Trainer:
    """Trains ``model`` with ``loss_fn`` epoch after epoch; after each, ``evaluate()`` (-> a metrics
    summary) and checkpoints. ``optimizer`` and ``scheduler`` (stepped once per epoch) come built."""

    def __init__(self, settings, model, loss_fn, optimizer, scheduler, train_loader, evaluate, device,
                 run_dir=None, log_scalar=None, teachers=None, dist=None):
        self.settings, self.model, self.loss_fn = settings, model, loss_fn
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.evaluate = train_loader, evaluate
        self.device, self.run_dir, self.teachers = device, run_dir, teachers
        self.dist = dist or DistInfo()
        self.log_scalar = log_scalar if self.dist.is_main and log_scalar else (lambda name, value, step: None)
        check_accumulation(settings.accumulation_steps, train_loader.local_batch)
        self.forward = training_forward(model, device, self.dist.world_size, settings.compile)
        self.amp_dtype = amp_dtype(device, settings.mixed_precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

        self.epoch = 0          # completed epochs
        self.step = 0           # training steps so far (fp16 steps the scaler skipped included)
        self.batches_done = 0   # steps already taken in the current epoch (mid-epoch checkpoints)
        # Summed finite loss of those steps and their number, on the device (read once per epoch), so
        # that a resumed epoch reports the mean of all its steps; the non-finite loss of a step the
        # fp16 scaler skipped is left out (those steps are counted in skipped_steps).
        self.epoch_loss_sum = torch.zeros((), device=device)
        self.epoch_loss_steps = torch.zeros((), dtype=torch.long, device=device)
        self.best = None        # best monitored value so far
        self.skipped_steps = 0  # fp16 steps the scaler skipped for non-finite gradients
        self._signal = None

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self, rng_states=None):
        """Everything a resumed run needs. ``rng_states``: one random state per rank (see ``save``)."""
        return {
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states or [rng_state(self.device)],
            "epoch": self.epoch, "step": self.step, "batches_done": self.batches_done,
            "train_items": len(self.train_loader.dataset),
            "epoch_loss_sum": float(self.epoch_loss_sum), "epoch_loss_steps": int(self.epoch_loss_steps),
            "best": self.best, "skipped_steps": self.skipped_steps, "config": self.settings.config,
        }

    def load_state_dict(self, state, path):
        missing = [k for k in ("loss", "optimizer", "scheduler", "scaler", "rng", "batches_done") if k not in state]
        if missing:
            raise CheckpointError(f"{path}: holds model weights but no training state ({', '.join(missing)}), so "
                                  "it cannot be resumed; use it as a teacher (config key 'teachers.checkpoints') "
                                  "or evaluate it with test.py")
        try:
            self.model.load_state_dict(state["model"])
            self.loss_fn.load_state_dict(state["loss"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: does not fit this model and config "
                                  f"({first_line(e)})") from None
        items, saved_items = len(self.train_loader.dataset), state.get("train_items")
        if state["batches_done"] and saved_items not in (None, items):  # the epoch's order would change
            raise CheckpointError(f"{path}: stopped {state['batches_done']} batches into an epoch over "
                                  f"{saved_items} training items, but the training data now has {items}; "
                                  "resume with the same training data, or start a new run")
        self.scheduler.load_state_dict(state["scheduler"])
        # A run resumed under another precision (fp16 after bf16 or fp32, on another GPU say) starts
        # a fresh gradient scaler: a disabled scaler saved no state.
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        rng = saved_rng_states(state["rng"], self.device)
        if self.dist.rank < len(rng):
            set_rng_state(self.device, rng[self.dist.rank])
        else:  # resumed with more processes than were saved: a fresh stream for this rank
            seed_rank(self.settings.seed + state["step"], self.dist.rank)
        self.epoch, self.step, self.batches_done = state["epoch"], state["step"], state["batches_done"]
        # Older checkpoints saved no step count (every step was counted), or no sum at all (the mean
        # then starts at the resumed step).
        steps = state.get("epoch_loss_steps", self.batches_done if "epoch_loss_sum" in state else 0)
        self.epoch_loss_sum = torch.tensor(state.get("epoch_loss_sum", 0.0), device=self.device)
        self.epoch_loss_steps = torch.tensor(steps, dtype=torch.long, device=self.device)
        self.best, self.skipped_steps = state["best"], state["skipped_steps"]

    def resume(self, path):
        self.load_state_dict(load_checkpoint(path, map_location=self.device), path)
        self.print(f"resumed from {path}: epoch {self.epoch}, step {self.step}, "
                   f"{self.batches_done} batches into the next epoch")

    def save(self, name):
        path = self.run_dir / name if self.run_dir else None
        rng_states = gather_to_main(rng_state(self.device))  # every rank's streams, so a resume continues each
        return on_main(lambda: save_checkpoint(self.state_dict(rng_states), path))

    def print(self, *args):
        if self.dist.is_main:
            print(*args, flush=True)

    # ---- one optimizer step ------------------------------------------------------------------
    @staticmethod
    def _inputs(batch):
        return batch.video, batch.video_mask, batch.student

    def _rows(self, batch):
        """Row masks of the loss, computed on the CPU batch. A mask that keeps every row is left out
        in a single process, so the loss takes its plain, unmasked path; under DDP every rank passes
        every mask, for the gathers to match."""
        rows = RowMasks.of({lang: batch.has_caption[lang] for lang in batch.student},
                           has_video=batch.video_mask.any(dim=1))
        if self.dist.world_size == 1:
            rows = rows.without_full_masks()
        return rows.to(self.device)

    def training_step(self, batch):
        """Forward, loss over the (global) batch, backward, optimizer step. Returns (loss, terms)."""
        rows = self._rows(batch)
        batch = batch.to(self.device)
        with autocast(self.device, self.amp_dtype):  # online teachers run under autocast, as in the reference
            teacher_sims = self.teachers.similarities(batch) if self.teachers is not None else None
        self.optimizer.zero_grad(set_to_none=True)
        if self.settings.accumulation_steps == 1:
            with autocast(self.device, self.amp_dtype):
                video, text = self.forward(*self._inputs(batch))
                loss, terms = self.loss_fn(text, video, teacher_sims=teacher_sims, rows=rows)
            self._check_finite(loss, terms, batch)
            self.scaler.scale(loss).backward()
        else:
            loss, terms = self._accumulated_backward(batch, teacher_sims, rows)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale is not None and self.scaler.get_scale() < scale:
            self._count_skipped_step(terms)
        return loss.detach(), terms

    def _accumulated_backward(self, batch, teacher_sims, rows):
        """Gradient accumulation that gives the gradients of the whole batch (GradCache, Gao et al. 2021).

        A contrastive loss couples every item of the batch, so summing losses of micro-batches would
        change the objective. Instead: embed each micro-batch without a graph; compute the loss of
        the whole batch on those embeddings and its gradient with respect to them; then re-run each
        micro-batch with a graph, under the same random state, and back-propagate that gradient.
        """
        micro = batch.split(self.settings.accumulation_steps)
        languages = list(batch.student)
        states, videos, texts = [], [], []
        with torch.no_grad():
            for part in micro:
                states.append(rng_state(self.device))
                with autocast(self.device, self.amp_dtype):
                    v, t = self.model(*self._inputs(part))
                videos.append(v)
                texts.append(t)
        video = torch.cat(videos).detach().requires_grad_()
        text = {lang: torch.cat([t[lang] for t in texts]).detach().requires_grad_() for lang in languages}
        with autocast(self.device, self.amp_dtype):
            loss, terms = self.loss_fn(text, video, teacher_sims=teacher_sims, rows=rows)
        self._check_finite(loss, terms, batch)
        self.scaler.scale(loss).backward()
        sizes = [len(part) for part in micro]
        video_grads = video.grad.split(sizes)
        text_grads = {lang: text[lang].grad.split(sizes) for lang in languages}
        for i, part in enumerate(micro):
            set_rng_state(self.device, states[i])
            last = i == len(micro) - 1
            sync = self.forward.no_sync() if (isinstance(self.forward, DistributedDataParallel) and not last) \
                else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.amp_dtype):
                    v, t = self.forward(*self._inputs(part))
                outputs = [v, *(t[lang] for lang in languages)]
                grads = [video_grads[i], *(text_grads[lang][i] for lang in languages)]
                torch.autograd.backward(outputs, grads)
        return loss, terms

    def _check_finite(self, loss, terms, batch):
        if self.scaler.is_enabled():  # fp16: the scaler skips such steps; they are counted instead
            return
        # One device sync per step: the price of naming the exact step and items of a bad loss.
        if not torch.isfinite(loss.detach()).item():
            shown = listed(self.train_loader.item_ids(batch.index), limit=8)
            items = "items" if self.dist.world_size == 1 else f"items of rank {self.dist.rank}'s share of the batch"
            raise NonFiniteLoss(
                f"non-finite loss {loss.item()} at step {self.step + 1} (epoch {self.epoch + 1}); terms: "
                + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()) + f"; {items}: {shown}")

    def _count_skipped_step(self, terms):
        self.skipped_steps += 1
        limit = self.settings.max_skipped_steps
        if self.skipped_steps > limit:
            raise NonFiniteLoss(f"the fp16 gradient scaler skipped {self.skipped_steps} steps (more than "
                                f"trainer.max_skipped_steps = {limit}); last terms: "
                                + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()))

    # ---- epochs ------------------------------------------------------------------------------
    def train_epoch(self):
        """Train the rest of the current epoch; return the mean loss over the epoch's steps (those taken
        before a mid-epoch resume included; NaN if no step had a finite loss). Every ``log_every``
        steps and at the epoch's last, log the loss, the learning rate and the throughput since the
        previous log point."""
        self.forward.train()
        self.train_loader.set_epoch(self.epoch, start_batch=self.batches_done)
        cap, per_epoch = self.settings.max_steps_per_epoch, self.train_loader.batches_per_epoch()
        total = per_epoch if cap is None else min(cap, per_epoch)
        if self.batches_done == 0:
            self.epoch_loss_sum.zero_()
            self.epoch_loss_steps.zero_()
        samples, since = 0, time.perf_counter()
        with tqdm(total=total, initial=self.batches_done, desc=f"epoch {self.epoch + 1}", dynamic_ncols=True,
                  disable=not self.dist.is_main) as bar:
            for batch in self.train_loader:
                if self.batches_done >= total:
                    break
                loss, _ = self.training_step(batch)
                finite = torch.isfinite(loss)  # a non-finite loss survives only under fp16's scaler
                self.epoch_loss_sum += torch.where(finite, loss, 0.0)
                self.epoch_loss_steps += finite
                self.step += 1
                self.batches_done += 1
                samples += len(batch) * self.dist.world_size
                bar.update(1)
                if self.step % self.settings.log_every == 0 or self.batches_done == total:
                    value = loss.item()  # waits for the device: the time below covers finished steps
                    now = time.perf_counter()
                    self._log_step(bar, value, samples / (now - since))
                    samples, since = 0, now
                self._stop_if_requested(bar)
        steps = self.epoch_loss_steps.item()
        return self.epoch_loss_sum.item() / steps if steps else float("nan")

    def _log_step(self, bar, loss, samples_per_s):
        lr = self.optimizer.param_groups[0]["lr"]  # the model's group (learnable teacher weights have their own)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", samples_per_s=f"{samples_per_s:.1f}")
        self.log_scalar("train.loss", loss, self.step)
        self.log_scalar("train.lr", lr, self.step)
        self.log_scalar("train.samples_per_s", samples_per_s, self.step)

    def _stop_if_requested(self, bar):
        """After a SIGINT or SIGTERM (on any rank): write latest.pt and stop."""
        signum = self._signal or 0
        if self.dist.world_size > 1:
            flag = torch.tensor([signum], device=self.device)  # every rank stops at the same step
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            bar.close()
            path = self.save("latest.pt")
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(signum).name} at epoch {self.epoch + 1}, step {self.step}; "
                f"checkpoint written to {path}; resume with: python train.py -r {path}", signum)

    def _improves(self, monitor, flat):
        if self.best is None:
            return True
        lower_is_better = monitor.endswith(("MedR", "MeanR"))
        return flat[monitor] < self.best if lower_is_better else flat[monitor] > self.best

    def fit(self):
        """Train until ``epochs``; SIGINT/SIGTERM stop after the current step with a checkpoint."""
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._fit()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def _on_signal(self, signum, frame):
        if self._signal is not None:  # a second signal: stop now, the last checkpoint stays intact
            raise KeyboardInterrupt
        self._signal = signum
        self.print(f"\n{signal.Signals(signum).name} received: stopping after this step")

    def _fit(self):
        epochs, monitor, period = self.settings.epochs, self.settings.monitor, self.settings.save_period
        summary = None
        while self.epoch < epochs:
            train_loss = self.train_epoch()
            self.scheduler.step()
            self.epoch += 1
            self.batches_done = 0
            summary = self.evaluate()
            flat = flat_metrics(summary)
            self.log_scalar("train.epoch_loss", train_loss, self.epoch)
            for name, value in flat.items():
                self.log_scalar(f"val.{name}", value, self.epoch)
            self.print(f"epoch {self.epoch}/{epochs}  train loss {train_loss:.4f}")
            self.print(format_table(summary, stats=("R1", "R5", "R10", "MedR")))
            improved = monitor != "off" and self._improves(monitor, flat)
            if improved:
                self.best = flat[monitor]
            self.save("latest.pt")
            if improved:
                self.save("best.pt")
            if period and self.epoch % period == 0:
                self.save(f"checkpoint-epoch{self.epoch}.pt")
        return summary
