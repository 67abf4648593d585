"""Loading Hugging Face models and processors by hub id or local folder, with one-line errors.
A ground helper: it imports nothing of the project but the error helpers."""
from pathlib import Path

from utils.errors import first_line

EXPECTED = " (a hub id or a folder written by save_pretrained is expected)"


def model_identity(name):
    """How a model is recorded (caches, datasets, settings): a folder by its absolute path, else the hub id."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def quiet_transformers():
    # Loading progress bars and notices would bury the one-line errors and the training log.
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def check_local_folder(what, name, error):
    """A name that can only be a local path (a hub id is 'name' or 'org/name') must exist; otherwise
    transformers would report it as a malformed hub id."""
    if (name.startswith((".", "/", "~")) or name.count("/") > 1) and not Path(name).expanduser().exists():
        raise error(f"{what} '{name}': no such folder (a hub id has the form 'name' or 'org/name')")


def load_named(what, name, load, error, expected=EXPECTED):
    """``load()`` of the model ``name``, with a missing folder, an unreachable hub id or a folder of
    something else as one line in an ``error``."""
    check_local_folder(what, name, error)
    quiet_transformers()
    try:
        return load()
    except (OSError, ValueError) as e:
        raise error(f"{what} '{name}' could not be loaded{expected}: {first_line(e)}") from None
