"""Sacred bookkeeping shared by train.py and test.py.

Each run gets a folder ``<trainer.save_dir>/<name>/<run id>/`` written by Sacred's
FileStorageObserver (config.json, run.json with host and dependencies, metrics.json with the
per-epoch scalars, cout.txt, sources); checkpoints are written into the same folder. A MongoDB
observer and a Neptune observer can be added from the command line.
"""
import json
import os
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

from sacred import SETTINGS, Experiment  # noqa: E402
from sacred.observers import FileStorageObserver  # noqa: E402

from utils.distributed import on_main, rank  # noqa: E402

# tqdm progress bars and Sacred's file-descriptor capture do not mix; capture at sys level.
SETTINGS.CAPTURE_MODE = "sys"
SETTINGS.DISCOVER_SOURCES = "dir"


class ObserverError(RuntimeError):
    """An optional observer was requested but cannot be used."""


def _mongo_observer(url):
    try:
        from sacred.observers import MongoObserver
        import pymongo  # noqa: F401
    except ImportError:
        raise ObserverError("--mongo needs the pymongo package: pip install pymongo") from None
    return MongoObserver(url=url)


def _neptune_observer():
    try:
        from neptune.integrations.sacred import NeptuneObserver
        import neptune
    except ImportError:
        raise ObserverError("-n/--neptune needs the optional neptune package: "
                            "pip install neptune neptune-sacred") from None
    return NeptuneObserver(run=neptune.init_run())


def run_experiment(name, config, main, run_root, run_id=None, mongo=None, neptune=False):
    """Run ``main(config, run)`` as a Sacred experiment observed into ``run_root``; return its result.

    ``config`` is plain JSON-like data; ``run.observers[0].dir`` is the run folder. Under
    torch.distributed only rank 0 records the run; the other ranks run the same experiment
    unobserved, and learn from rank 0 whether the run folder can be written.
    """
    ex = Experiment(name, save_git_info=False)
    ex.add_config(config)
    on_main(lambda: check_writable(run_root, run_id))
    if rank() == 0:
        ex.observers.append(FileStorageObserver(str(run_root)))
        if mongo:
            ex.observers.append(_mongo_observer(mongo))
        if neptune:
            ex.observers.append(_neptune_observer())

    @ex.main
    def _main(_run, _config):
        return main(json.loads(json.dumps(_config)), _run)  # Sacred hands out read-only containers

    # Failures are reported by the entry points in one line (and recorded in run.json by the
    # observer); Sacred's own log lines would repeat them.
    options = {"--loglevel": "CRITICAL"}
    if run_id is not None:
        options["--id"] = run_id
    run = ex.run(options=options)
    return run.result


def check_writable(run_root, run_id=None):
    """Fail before anything runs when the run folder cannot be created or written."""
    run_root = Path(run_root)
    if run_id is not None and (run_root / run_id).exists():
        raise ObserverError(f"{run_root / run_id}: run folder exists; pick another --run-id or remove it")
    try:
        run_root.mkdir(parents=True, exist_ok=True)
        probe = run_root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ObserverError(f"{run_root}: cannot write run folders here ({e.strerror or e})") from None


def run_dir(run):
    return Path(run.observers[0].dir)
