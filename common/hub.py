"""Loading Hugging Face models and processors by hub id or local folder, with one-line errors.
A ground helper: it imports nothing of the project but the error helpers."""
from pathlib import Path

from common.errors import first_line

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


def hub_options(what, name, probe_file, error):
    """Options for ``from_pretrained(name)``. A hub id that is neither in the local Hugging Face
    cache nor reachable fails here in one line, instead of after a minute of retries; a cached one
    is then read from the cache only."""
    if Path(name).expanduser().exists():
        return {}
    from huggingface_hub import constants, try_to_load_from_cache
    cached = isinstance(try_to_load_from_cache(name, probe_file), str)
    if not constants.HF_HUB_OFFLINE and reachable(constants.ENDPOINT):
        return {}
    if cached:
        return {"local_files_only": True}
    why = "is off (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "cannot be reached"
    raise error(f"{what} '{name}': not a local folder, not in the Hugging Face cache, and {constants.ENDPOINT} "
                f"{why}; download it where the hub is reachable (hf download {name} --local-dir DIR) and name "
                "that folder instead")


def reachable(url, timeout=3):
    """Whether ``url`` answers at all (any HTTP status) within ``timeout`` seconds; proxies from the
    environment are used."""
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def load_named(what, name, load, error, probe_file="config.json", expected=EXPECTED):
    """``load(**options)`` of the model ``name``, with a missing folder, an unreachable hub id or a
    folder of something else as one line in an ``error``. ``options`` are ``from_pretrained``'s
    (``local_files_only`` for a hub id read from the cache); ``probe_file`` is a file every such
    model has, to look up in the cache."""
    check_local_folder(what, name, error)
    options = hub_options(what, name, probe_file, error)
    quiet_transformers()
    try:
        return load(**options)
    except (OSError, ValueError) as e:
        raise error(f"{what} '{name}' could not be loaded{expected}: {first_line(e)}") from None
