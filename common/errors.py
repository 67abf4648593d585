"""The errors a user can act on: entry points print their one-line message instead of a traceback."""
import os
import sys
import warnings


def first_line(error, limit=200):
    """The first line of an exception's message (its type when empty), cut at ``limit`` characters:
    the detail a one-line error can quote from a library's exception."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


class UserError(Exception):
    """An error whose message tells the user what to change: every such error of the project
    subclasses it, so that the entry points catch this one type."""


class ConfigError(UserError, ValueError):
    """A config file, key or value is invalid; the message names it."""
    same_on_every_rank = True  # every process of a torchrun reads the same config: rank 0 reports it


def run_command(action, debug=False):
    """Run ``action()`` as a command-line program and return its exit status (what it returns, 0 for
    None): a ``UserError``, or a file that cannot be read or written,
    prints ``error: <one line>`` and gives status 2 (``debug``: the traceback instead); warnings
    print as ``warning: <message>``, without file and source line."""
    if not debug:
        warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        return action() or 0
    except UserError as e:
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
    error, or rank 0's error passed on by ``common.distributed.on_main``) is printed by rank 0 only."""
    return os.environ.get("RANK", "0") != "0" and getattr(error, "same_on_every_rank", False)
