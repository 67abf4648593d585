"""The errors a user can act on: entry points print their one-line message instead of a traceback."""
import sys
import warnings

from data_loader.safe_pickle import DataFileError
from model.model import ModelError
from parse_config import ConfigError
from trainer.trainer import NonFiniteLoss
from utils.checkpoint import CheckpointError
from utils.experiment import ObserverError
from utils.inference import InferenceError

USER_ERRORS = (ConfigError, DataFileError, CheckpointError, ModelError, ObserverError, InferenceError,
               NonFiniteLoss)


def run_command(action, debug=False):
    """Run ``action()`` as a command-line program and return its exit status: a user error, or a
    file that cannot be read or written, prints ``error: <one line>`` and gives status 2 (``debug``:
    the traceback instead); warnings print as ``warning: <message>``, without file and source line."""
    if not debug:
        warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        action()
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if debug or e.filename is None:  # not about a path the user named
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0
