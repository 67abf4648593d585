"""Checkpoints: plain dicts of tensors, numbers, strings and containers.

They are written atomically (a temporary file in the same folder, fsync, then rename), so a run
killed at any moment leaves the previous file intact, and read with ``weights_only=True``, so
loading one never runs code. The resolved config travels inside as plain data.
"""
import os
import tempfile
from pathlib import Path

import torch

FORMAT = "c2kd-retrieval"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read, or is not one of this project's."""


def save_checkpoint(state, path):
    return atomic_save({"format": FORMAT, "version": VERSION, **state}, path)


def atomic_write(path, write):
    """Write ``path`` through ``write(binary file)`` into a temporary file in the same folder, fsync,
    then rename: a reader, or a run killed at any moment, sees the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates owner-only files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(state, path):
    """torch.save through ``atomic_write``; a failure leaves the previous file as it was."""
    try:
        return atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write ({e.strerror or e}); "
                              "the previous file is unchanged") from None


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (a reference checkpoint "
                              "must first go through utils.convert_checkpoint)")
    if state.get("version", 1) > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state['version']} is newer than this code "
                              f"reads ({VERSION}); update the code")
    return state


def load_weights(model, state, path):
    """Load ``state["model"]`` into ``model``; a mismatch is a one-line error naming the file."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes "
                              f"({str(e).strip().splitlines()[0][:200]})") from None
    return model
