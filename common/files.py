"""Writing files whole: a reader, or a run killed at any moment, sees the old file or the new one.
Kept free of torch, so the data tools start quickly."""
import os
import tempfile
from pathlib import Path


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
