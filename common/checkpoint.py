"""Checkpoints: plain dicts of tensors, numbers, strings and containers.

They are written atomically (a temporary file in the same folder, fsync, then rename), so a run
killed at any moment leaves the previous file intact, and read with ``weights_only=True``, so
loading one never runs code. The resolved config travels inside as plain data.
"""
import pickle
import re
from pathlib import Path

import torch

from common.errors import UserError, first_line
from common.files import atomic_write

FORMAT = "c2kd-retrieval"
VERSION = 1


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be written, read, or is not one of this project's."""


def save_checkpoint(state, path):
    return atomic_save({"format": FORMAT, "version": VERSION, **state}, path)


def atomic_save(state, path):
    """torch.save through ``atomic_write``; a failure leaves the previous file as it was."""
    def write(f):
        sink = _Sink(f)
        try:
            torch.save(state, sink)
        except RuntimeError:  # torch's writer reports a failed write as "unexpected pos"
            if sink.error is None:
                raise
            raise sink.error from None
    try:
        return atomic_write(path, write)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write ({e.strerror or e}); "
                              "the previous file is unchanged") from None


class _Sink:
    """A binary file that remembers the OSError of a failed write, which torch.save hides."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


CONVERT = "python -m utils.convert_checkpoint SRC DST"


def load_checkpoint(path, map_location="cpu", mmap=False):
    """The checkpoint at ``path``, checked to be one of this project's. With ``mmap`` its tensors
    are mapped from the file rather than read: only what is used is read."""
    path = Path(path)
    if path.is_dir():
        inside = " (it holds latest.pt)" if (path / "latest.pt").is_file() else ""
        raise CheckpointError(f"{path}: is a folder{inside}; expected a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes); a checkpoint copy or download did not finish")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch advises loading an object it refused unrestricted: never, for a file that may carry
        # a payload. The reference's checkpoints hold a pickled config object.
        if "Unsupported global" in str(e):
            raise CheckpointError(f"{path}: not a readable checkpoint (it holds Python objects besides tensors and "
                                  f"plain data, which are never loaded); a reference checkpoint must first be "
                                  f"converted: {CONVERT}") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({_torch_reason(e)})") from None
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({_torch_reason(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (a reference checkpoint "
                              f"must first be converted: {CONVERT})")
    if state.get("version", 1) > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state['version']} is newer than this code "
                              f"reads ({VERSION}); update the code")
    return state


def _torch_reason(error):
    """The cause in one of torch.load's errors, without its advice or terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    cause = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    return cause.group(1).strip()[:200] if cause else first_line(text)


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
    """Load ``state["model"]`` into ``model``; a mismatch is a one-line error naming the file and
    the first weight that differs."""
    expected, given = model.state_dict(), state["model"]
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    resized = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    if resized:
        key = resized[0]
        problem = (f"weight '{key}' has shape {list(given[key].shape)}, the model {list(expected[key].shape)} "
                   f"({len(resized)} weight(s) differ)")
    elif missing or unexpected:
        key = (missing or unexpected)[0]
        problem = (f"weight '{key}' is {'missing' if missing else 'not in the model'} "
                   f"({len(missing)} missing, {len(unexpected)} unexpected)")
    if resized or missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes: {problem}")
    model.load_state_dict(given)
    return model
