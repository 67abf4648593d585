"""The errors a user can act on: entry points print their one-line message instead of a traceback."""
import os
import sys
import warnings


def first_line(error, limit=200):
    """The first line of an exception's message (its type when empty), cut at ``limit`` characters:
    the detail a one-line error can quote from a library's exception."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def user_errors():
    """The project's error types whose message tells the user what to change. Imported on use, so
    that the data tools, which need only their own, start without torch."""
    from data_loader.safe_pickle import DataFileError
    from model.model import ModelError
    from parse_config import ConfigError
    from trainer.trainer import NonFiniteLoss
    from utils.checkpoint import CheckpointError
    from utils.experiment import ObserverError
    from utils.inference import InferenceError
    return (ConfigError, DataFileError, CheckpointError, ModelError, ObserverError, InferenceError, NonFiniteLoss)


def run_command(action, debug=False, errors=None):
    """Run ``action()`` as a command-line program and return its exit status (what it returns, 0 for
    None): one of ``errors`` (default: ``user_errors()``), or a file that cannot be read or written,
    prints ``error: <one line>`` and gives status 2 (``debug``: the traceback instead); warnings
    print as ``warning: <message>``, without file and source line."""
    errors = user_errors() if errors is None else errors
    if not debug:
        warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        return action() or 0
    except errors as e:
        if debug:
            raise
        if not reported_by_another_rank(e):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug or e.filename is None:  # not about a path the user named
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


def reported_by_another_rank(error):
    """Under torchrun, an error that every rank raises alike (``same_on_every_rank``: a config
    error, or rank 0's error passed on by ``utils.distributed.on_main``) is printed by rank 0 only."""
    return os.environ.get("RANK", "0") != "0" and getattr(error, "same_on_every_rank", False)
