"""Checkpoints: plain dicts of tensors, numbers, strings and containers.

They are written atomically (a temporary file in the same folder, fsync, then rename), so a run
killed at any moment leaves the previous file intact, and read with ``weights_only=True``, so
loading one never runs code. The resolved config travels inside as plain data.
"""
from pathlib import Path

import torch

from utils.errors import first_line
from utils.files import atomic_write

FORMAT = "c2kd-retrieval"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read, or is not one of this project's."""


def save_checkpoint(state, path):
    return atomic_save({"format": FORMAT, "version": VERSION, **state}, path)


def atomic_save(state, path):
    """torch.save through ``atomic_write``; a failure leaves the previous file as it was."""
    try:
        return atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write ({e.strerror or e}); "
                              "the previous file is unchanged") from None


def load_checkpoint(path, map_location="cpu", mmap=False):
    """The checkpoint at ``path``, checked to be one of this project's. With ``mmap`` its tensors
    are mapped from the file rather than read: only what is used is read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (a reference checkpoint "
                              "must first go through utils.convert_checkpoint)")
    if state.get("version", 1) > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state['version']} is newer than this code "
                              f"reads ({VERSION}); update the code")
    return state


def checkpoint_header(path):
    """What a checkpoint says about its run (config, epoch, step, ...) without its tensors, which
    are never read: a run resumed from it loads the whole checkpoint once, in the trainer."""
    return {k: v for k, v in load_checkpoint(path, mmap=True).items() if not _holds_tensors(v)}


def _holds_tensors(value):
    if isinstance(value, dict):
        return any(_holds_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v) for v in value)
    return isinstance(value, torch.Tensor)


def load_weights(model, state, path):
    """Load ``state["model"]`` into ``model``; a mismatch is a one-line error naming the file."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes "
                              f"({first_line(e)})") from None
    return model
