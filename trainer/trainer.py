"""The training loop: one epoch of steps, an evaluation, a checkpoint; repeat.

Optimisation follows the reference (§5): Adam on every trainable parameter, ExponentialLR
stepped once per epoch, no gradient clipping. On CUDA the forward pass runs under autocast
(bf16, or fp16 with a gradient scaler) for every stage; on the CPU it is plain fp32.
"""
import math
import random

import numpy as np
import torch
from tqdm import tqdm

from model.metric import format_table
from parse_config import ConfigError
from trainer.evaluate import evaluate, flat_metrics
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.device import amp_dtype, autocast, to_device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config, model, loss_fn, train_loader, eval_loader, device, run_dir,
                 log_scalar=None, teachers=None):
        self.config, self.model, self.loss_fn = config, model, loss_fn
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.device, self.run_dir, self.teachers = device, run_dir, teachers
        self.log_scalar = log_scalar or (lambda name, value, step: None)
        self.languages = train_loader.dataset.text_inputs[0].languages
        self.eval_languages = eval_loader.dataset.text_inputs[0].languages

        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config["optimizer"]["lr"]}]
        loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
        if loss_params:  # learnable teacher weights train with their own learning rate
            groups.append({"params": loss_params, "lr": config["teachers"]["learnable_lr"]})
        self.optimizer = torch.optim.Adam(groups)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=config["scheduler"]["gamma"])
        self.amp_dtype = amp_dtype(device, config["trainer"]["mixed_precision"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.epoch = 0          # completed epochs
        self.step = 0           # optimizer steps so far
        self.batches_done = 0   # steps already taken in the current epoch (mid-epoch checkpoints)
        self.best = None        # best monitored value so far
        self.history = []       # flat metrics per evaluated epoch

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self):
        return {
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "epoch": self.epoch, "step": self.step, "batches_done": self.batches_done,
            "best": self.best, "config": self.config,
        }

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.epoch, self.step, self.batches_done = state["epoch"], state["step"], state["batches_done"]
        self.best = state["best"]

    def resume(self, path):
        self.load_state_dict(load_checkpoint(path, map_location=self.device))
        print(f"resumed from {path}: epoch {self.epoch}, step {self.step}")

    def save(self, name):
        return save_checkpoint(self.state_dict(), self.run_dir / name)

    # ---- training ----------------------------------------------------------------------------
    def training_step(self, batch):
        batch = to_device(batch, self.device)
        with autocast(self.device, self.amp_dtype):
            video = self.model.encode_video(batch["video"], batch["video_mask"])
            text = {lang: self.model.encode_text(batch["text"]["student"][lang]) for lang in self.languages}
            teacher_sims = self.teachers.similarities(batch) if self.teachers is not None else None
            rows = {lang: batch["has_caption"][lang] for lang in self.languages}
            rows["main"] = batch["video_mask"].any(dim=1) & batch["has_caption"]["en"]
            loss, terms = self.loss_fn(text, video, teacher_sims=teacher_sims, rows=rows)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), terms

    def train_epoch(self):
        self.model.train()
        sampler = self.train_loader.sampler
        sampler.set_epoch(self.epoch, start_batch=self.batches_done)
        self.train_loader.dataset.set_epoch(self.epoch)
        cap = self.config["trainer"]["max_steps_per_epoch"]
        total = sampler.num_batches() if cap is None else min(cap, sampler.num_batches())
        log_every = self.config["trainer"]["log_every"]
        bar = tqdm(total=total, initial=self.batches_done, desc=f"epoch {self.epoch + 1}", dynamic_ncols=True)
        losses = []
        for batch in self.train_loader:
            if self.batches_done >= total:
                break
            loss, terms = self.training_step(batch)
            self.step += 1
            self.batches_done += 1
            bar.update(1)
            if self.step % log_every == 0 or self.batches_done == total:
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"non-finite loss {value} at step {self.step}: "
                        + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()))
                losses.append(value)
                bar.set_postfix(loss=f"{value:.4f}")
                self.log_scalar("train.loss", value, self.step)
        bar.close()
        return sum(losses) / max(len(losses), 1)

    def evaluate(self, return_scores=False):
        return evaluate(self.model, self.eval_loader, self.eval_languages, self.config["eval"], self.device,
                        self.amp_dtype, return_scores=return_scores)

    def _improves(self, monitor, flat):
        if monitor not in flat:
            raise ConfigError(f"config key 'trainer.monitor' = '{monitor}' is not an evaluation metric; "
                           f"for example {', '.join(list(flat)[:3])}")
        if self.best is None:
            return True
        lower_is_better = monitor.endswith(("MedR", "MeanR"))
        return flat[monitor] < self.best if lower_is_better else flat[monitor] > self.best

    def fit(self):
        epochs = self.config["trainer"]["epochs"]
        monitor = self.config["trainer"]["monitor"]
        period = self.config["trainer"]["save_period"]
        summary = None
        while self.epoch < epochs:
            train_loss = self.train_epoch()
            self.scheduler.step()
            self.epoch += 1
            self.batches_done = 0
            summary = self.evaluate()
            flat = flat_metrics(summary)
            self.history.append({"epoch": self.epoch, "train_loss": train_loss, **flat})
            self.log_scalar("train.epoch_loss", train_loss, self.epoch)
            for name, value in flat.items():
                self.log_scalar(f"val.{name}", value, self.epoch)
            print(f"epoch {self.epoch}/{epochs}  train loss {train_loss:.4f}")
            print(format_table(summary, stats=("R1", "R5", "R10", "MedR")))
            improved = monitor != "off" and self._improves(monitor, flat)
            if improved:
                self.best = flat[monitor]
            self.save("latest.pt")
            if improved:
                self.save("best.pt")
            if period and self.epoch % period == 0:
                self.save(f"checkpoint-epoch{self.epoch}.pt")
        return summary
