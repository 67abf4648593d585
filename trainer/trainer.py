"""The training loop: one epoch of steps, an evaluation, a checkpoint; repeat.

Optimisation follows the reference (§5): Adam on every trainable parameter, ExponentialLR
stepped once per epoch, no gradient clipping. On CUDA the forward pass runs under autocast
(bf16, or fp16 with a gradient scaler; trainer.mixed_precision) in every stage; on the CPU it
is plain fp32.
Under torchrun the model is wrapped in DistributedDataParallel and the losses see the global
batch; only rank 0 writes checkpoints and logs.
"""
import contextlib
import json
import random
import signal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from config_keys import RESTORED_ON_RESUME, RESUME_MAY_CHANGE
from data_loader.corpus import listed
from data_loader.dataset import STUDENT
from model.loss import RowMasks
from model.metric import format_table
from parse_config import config_differences
from trainer.evaluate import evaluate, flat_metrics
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.device import amp_dtype, autocast, to_device
from utils.distributed import DistInfo, gather_to_main, on_main
from utils.errors import ConfigError, UserError, first_line


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a checkpoint was written (Sacred marks the run INTERRUPTED)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


class NonFiniteLoss(UserError, FloatingPointError):
    """The loss became NaN or infinite; the message names the step, the terms and the items."""


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_rank(seed, rank):
    """Give each rank its own random stream (dropout) once the model is built. Rank 0 keeps the
    stream it has, so a single-process run is unchanged; without this every rank would draw the
    same dropout masks for its slice of the global batch."""
    if rank:
        seed_everything((seed + 1_000_003 * rank) % 2**32)  # numpy takes seeds below 2**32


def split_batch(batch, parts):
    """``parts`` micro-batches of a nested dict of tensors, split along dim 0."""
    if isinstance(batch, torch.Tensor):
        return batch.chunk(parts)
    chunks = {k: split_batch(v, parts) for k, v in batch.items()}
    return [{k: v[i] for k, v in chunks.items()} for i in range(parts)]


def check_resumable(saved_config, config, path):
    """Refuse to resume ``path`` (whose config is ``saved_config``) under a config that differs
    in a key that a resumed run may not change (config_keys.py says which; teachers.learnable_lr
    counts only where the loss has learnable teacher weights: nothing else uses it)."""
    for key, saved, now in config_differences(saved_config, config, ignore=RESUME_MAY_CHANGE):
        if key == "teachers.learnable_lr" and config["loss"]["teacher_pool"] != "learnable":
            continue
        why = ("a resumed run continues the saved optimizer and schedule" if key in RESTORED_ON_RESUME
               else "a resumed run continues the same experiment")
        raise ConfigError(f"{path}: config key '{key}' = {json.dumps(now)} differs from the checkpoint's "
                          f"{json.dumps(saved)}; {why}, so keep it, or start a new run")


class Trainer:
    def __init__(self, config, model, loss_fn, train_loader, eval_loader, device, run_dir,
                 log_scalar=None, teachers=None, dist=None):
        self.config, self.loss_fn = config, loss_fn
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.device, self.run_dir, self.teachers = device, run_dir, teachers
        self.dist = dist or DistInfo()
        self.log_scalar = log_scalar if self.dist.is_main and log_scalar else (lambda name, value, step: None)
        self.languages = train_loader.dataset.text_inputs[0].languages
        self.eval_languages = eval_loader.dataset.text_inputs[0].languages
        trainer_cfg = config["trainer"]
        self.accumulation = trainer_cfg["accumulation_steps"]
        if train_loader.sampler.local_batch % self.accumulation:
            raise ConfigError(f"config key 'trainer.accumulation_steps' = {self.accumulation} does not divide the "
                              f"per-process batch of {train_loader.sampler.local_batch}")

        self.model = model  # the plain module: state dicts, evaluation
        self.forward = model
        if self.dist.world_size > 1:
            self.forward = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if trainer_cfg["compile"]:
            self.forward = torch.compile(self.forward)

        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config["optimizer"]["lr"]}]
        loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
        if loss_params:  # learnable teacher weights train with their own learning rate
            groups.append({"params": loss_params, "lr": config["teachers"]["learnable_lr"]})
        self.optimizer = torch.optim.Adam(groups)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=config["scheduler"]["gamma"])
        self.amp_dtype = amp_dtype(device, trainer_cfg["mixed_precision"])
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
            "rng": rng_states or [_rng_state(self.device)],
            "epoch": self.epoch, "step": self.step, "batches_done": self.batches_done,
            "train_items": len(self.train_loader.dataset),
            "epoch_loss_sum": float(self.epoch_loss_sum), "epoch_loss_steps": int(self.epoch_loss_steps),
            "best": self.best, "skipped_steps": self.skipped_steps, "config": self.config,
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
        rng = _saved_rng_states(state["rng"], self.device)
        if self.dist.rank < len(rng):
            _set_rng_state(self.device, rng[self.dist.rank])
        else:  # resumed with more processes than were saved: a fresh stream for this rank
            seed_rank(self.config["seed"] + state["step"], self.dist.rank)
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
        rng_states = gather_to_main(_rng_state(self.device))  # every rank's streams, so a resume continues each
        return on_main(lambda: save_checkpoint(self.state_dict(rng_states), path))

    def print(self, *args):
        if self.dist.is_main:
            print(*args, flush=True)

    # ---- one optimizer step ------------------------------------------------------------------
    def _inputs(self, batch):
        return batch["video"], batch["video_mask"], {lang: batch["text"][STUDENT][lang] for lang in self.languages}

    def _rows(self, batch):
        """Row masks of the loss, computed on the CPU batch. A mask that keeps every row is left out
        in a single process, so the loss takes its plain, unmasked path; under DDP every rank passes
        every mask, for the gathers to match."""
        rows = RowMasks.of({lang: batch["has_caption"][lang] for lang in self.languages},
                           has_video=batch["video_mask"].any(dim=1))
        if self.dist.world_size == 1:
            rows = rows.without_full_masks()
        return rows.to(self.device)

    def training_step(self, batch):
        """Forward, loss over the (global) batch, backward, optimizer step. Returns (loss, terms)."""
        rows = self._rows(batch)
        batch = to_device(batch, self.device)
        with autocast(self.device, self.amp_dtype):  # online teachers run under autocast, as in the reference
            teacher_sims = self.teachers.similarities(batch) if self.teachers is not None else None
        self.optimizer.zero_grad(set_to_none=True)
        if self.accumulation == 1:
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
        micro = split_batch(batch, self.accumulation)
        states, videos, texts = [], [], []
        with torch.no_grad():
            for part in micro:
                states.append(_rng_state(self.device))
                with autocast(self.device, self.amp_dtype):
                    v, t = self.model(*self._inputs(part))
                videos.append(v)
                texts.append(t)
        video = torch.cat(videos).detach().requires_grad_()
        text = {lang: torch.cat([t[lang] for t in texts]).detach().requires_grad_() for lang in self.languages}
        with autocast(self.device, self.amp_dtype):
            loss, terms = self.loss_fn(text, video, teacher_sims=teacher_sims, rows=rows)
        self._check_finite(loss, terms, batch)
        self.scaler.scale(loss).backward()
        sizes = [len(part["video"]) for part in micro]
        video_grads = video.grad.split(sizes)
        text_grads = {lang: text[lang].grad.split(sizes) for lang in self.languages}
        for i, part in enumerate(micro):
            _set_rng_state(self.device, states[i])
            last = i == len(micro) - 1
            sync = self.forward.no_sync() if (isinstance(self.forward, DistributedDataParallel) and not last) \
                else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.amp_dtype):
                    v, t = self.forward(*self._inputs(part))
                outputs = [v, *(t[lang] for lang in self.languages)]
                grads = [video_grads[i], *(text_grads[lang][i] for lang in self.languages)]
                torch.autograd.backward(outputs, grads)
        return loss, terms

    def _check_finite(self, loss, terms, batch):
        if self.scaler.is_enabled():  # fp16: the scaler skips such steps; they are counted instead
            return
        # One device sync per step: the price of naming the exact step and items of a bad loss.
        if not torch.isfinite(loss.detach()).item():
            shown = listed([self.train_loader.dataset.corpus.ids[i] for i in batch["index"].tolist()], limit=8)
            items = "items" if self.dist.world_size == 1 else f"items of rank {self.dist.rank}'s share of the batch"
            raise NonFiniteLoss(
                f"non-finite loss {loss.item()} at step {self.step + 1} (epoch {self.epoch + 1}); terms: "
                + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()) + f"; {items}: {shown}")

    def _count_skipped_step(self, terms):
        self.skipped_steps += 1
        limit = self.config["trainer"]["max_skipped_steps"]
        if self.skipped_steps > limit:
            raise NonFiniteLoss(f"the fp16 gradient scaler skipped {self.skipped_steps} steps (more than "
                                f"trainer.max_skipped_steps = {limit}); last terms: "
                                + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()))

    # ---- epochs ------------------------------------------------------------------------------
    def _stop_requested(self):
        signum = self._signal or 0
        if self.dist.world_size == 1:
            return signum
        flag = torch.tensor([signum], device=self.device)  # every rank stops at the same step
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def train_epoch(self):
        """Train the rest of the current epoch; return the mean loss over the epoch's steps (those taken
        before a mid-epoch resume included; NaN if no step had a finite loss)."""
        self.forward.train()
        sampler = self.train_loader.sampler
        sampler.set_epoch(self.epoch, start_batch=self.batches_done)
        self.train_loader.dataset.set_epoch(self.epoch)
        cap = self.config["trainer"]["max_steps_per_epoch"]
        total = sampler.num_batches() if cap is None else min(cap, sampler.num_batches())
        log_every = self.config["trainer"]["log_every"]
        if self.batches_done == 0:
            self.epoch_loss_sum.zero_()
            self.epoch_loss_steps.zero_()
        with tqdm(total=total, initial=self.batches_done, desc=f"epoch {self.epoch + 1}", dynamic_ncols=True,
                  disable=not self.dist.is_main) as bar:
            for batch in self.train_loader:
                if self.batches_done >= total:
                    break
                loss, terms = self.training_step(batch)
                finite = torch.isfinite(loss)  # a non-finite loss survives only under fp16's scaler
                self.epoch_loss_sum += torch.where(finite, loss, 0.0)
                self.epoch_loss_steps += finite
                self.step += 1
                self.batches_done += 1
                bar.update(1)
                if self.step % log_every == 0 or self.batches_done == total:
                    value = loss.item()
                    bar.set_postfix(loss=f"{value:.4f}")
                    self.log_scalar("train.loss", value, self.step)
                signum = self._stop_requested()
                if signum:
                    bar.close()
                    path = self.save("latest.pt")
                    raise TrainingInterrupted(
                        f"stopped by {signal.Signals(signum).name} at epoch {self.epoch + 1}, step {self.step}; "
                        f"checkpoint written to {path}; resume with: python train.py -r {path}", signum)
        steps = self.epoch_loss_steps.item()
        return self.epoch_loss_sum.item() / steps if steps else float("nan")

    def evaluate(self):
        return evaluate(self.model, self.eval_loader, self.eval_languages, self.config["eval"], self.device)

    def _improves(self, monitor, flat):
        if self.best is None:
            return True
        lower_is_better = monitor.endswith(("MedR", "MeanR"))
        return flat[monitor] < self.best if lower_is_better else flat[monitor] > self.best

    def fit(self):
        """Train until ``trainer.epochs``; SIGINT/SIGTERM stop after the current step with a checkpoint."""
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
        epochs = self.config["trainer"]["epochs"]
        monitor = self.config["trainer"]["monitor"]  # a metric name, checked by train.py (check_monitor)
        period = self.config["trainer"]["save_period"]
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


def _rng_state(device):
    """The random state that dropout draws from: the CPU generator and, on CUDA, this rank's GPU's."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(device, state):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _saved_rng_states(rng, device):
    """A checkpoint's per-rank random states in the form ``_rng_state`` makes. Older checkpoints kept
    one state (a dict) holding the CUDA states of every visible GPU (a list); a checkpoint loaded
    with map_location on a GPU holds CUDA tensors, while the generators take CPU bytes."""
    states = []
    for state in [rng] if isinstance(rng, dict) else rng:
        cuda = state.get("cuda")
        if isinstance(cuda, list):
            cuda = cuda[min(device.index or 0, len(cuda) - 1)] if cuda else None
        states.append({"torch": state["torch"].cpu(), "cuda": None if cuda is None else cuda.cpu()})
    return states
