"""Restricted unpickling of the released feature pickles.

The released datasets are pickled lists of dicts holding strings, numbers and
numpy arrays. A plain ``pickle.load`` would run any code a downloaded file
names, so every pickle this project reads goes through ``load_pickle``, whose
unpickler resolves only the few globals that numpy arrays need and refuses
everything else before it is called.
"""
import pickle
from pathlib import Path

from common.errors import UserError

# Globals a pickle of plain containers and numpy arrays needs, and nothing more.
# numpy moved its internals from numpy.core to numpy._core in 2.0; files written
# by either version name one or the other.
_ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # numpy arrays pickled by Python 2 era code store bytes this way
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list."""


class DataUnpickler(pickle.Unpickler):
    """Plain containers, strings, numbers and numpy arrays: what the released data pickles hold."""
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refused global {module}.{name}: only plain containers, strings, numbers "
            "and numpy arrays are accepted")


class DataFileError(UserError, ValueError):
    """A data file is missing, unreadable or not in the expected layout."""


def load_pickle(path):
    """Load ``path`` with the restricted unpickler; every failure is a one-line DataFileError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return DataUnpickler(f).load()
    except FileNotFoundError:
        raise DataFileError(f"{path}: file not found") from None
    except UnsafePickleError as e:
        raise DataFileError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, OSError) as e:
        raise DataFileError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
