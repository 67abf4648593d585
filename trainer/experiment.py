"""Sacred bookkeeping shared by train.py and test.py.

Each run gets a folder ``<trainer.save_dir>/<name>/<run id>/`` written by Sacred's
FileStorageObserver (config.json, run.json with host and dependencies, metrics.json with the
per-epoch scalars, cout.txt, sources); checkpoints are written into the same folder. A MongoDB
observer (``RunRecordObserver``) and a Neptune observer can be added from the command line.

A run that did not finish continues in its own folder when resumed from that folder's latest.pt
(see ``continued_run_id``): the Sacred run keeps its id, run.json ends with the status of the last
attempt and lists the earlier ones under ``earlier_attempts``, cout.txt goes on, and metrics.json
keeps one value per step of each series: the first value a resumed attempt logs for a series
replaces that series' values from the same step on (work after the checkpoint that was redone).
While a run lives, its process holds an exclusive lock on its run.json, so a run folder in use is
never resumed, removed or written by a second process.

A training command that names its run folder (``--run-id``) can be repeated: it trains a new run,
resumes its own unfinished run, or reuses its own finished one (``existing_run``).

    python -m trainer.experiment state RUN_FOLDER   # what the folder holds (STATES)
"""
import importlib.metadata
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # no advisory locks on this platform: runs in use are not detected
    fcntl = None

warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

from sacred import SETTINGS, Experiment  # noqa: E402
from sacred.dependencies import PackageDependency  # noqa: E402
from sacred.observers import FileStorageObserver, MongoObserver  # noqa: E402
from sacred.observers.file_storage import DEFAULT_FILE_STORAGE_PRIORITY  # noqa: E402

from common.errors import ConfigError, UserError  # noqa: E402

# tqdm progress bars and Sacred's file-descriptor capture do not mix; capture at sys level.
SETTINGS.CAPTURE_MODE = "sys"
# run.json records every loaded module of this project as a source (copied into _sources/) and
# every loaded package with its version (torch, transformers, tokenizers, ...).
SETTINGS.DISCOVER_SOURCES = "sys"
SETTINGS.DISCOVER_DEPENDENCIES = "sys"
ROOT = Path(__file__).resolve().parents[1]
# Imported lazily (after the run starts), so named here to be recorded in every run.json.
RECORDED_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy")

RESUMABLE = "latest.pt"  # the checkpoint that holds where an unfinished run stopped


class ObserverError(UserError, RuntimeError):
    """An optional observer was requested but cannot be used, or the run folder cannot be used."""


# ---- run folders ---------------------------------------------------------------------------------

def run_status(folder):
    """Sacred's status of the run in ``folder`` (COMPLETED, RUNNING, INTERRUPTED, FAILED, ...), or
    None when the folder holds no readable run.json."""
    try:
        return json.loads((Path(folder) / "run.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def lock_file(path, create=False):
    """An open descriptor holding an exclusive lock on ``path``; None when another process holds
    it. Opened read-write, as NFS needs for an exclusive lock."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        os.close(fd)
        return None
    return fd


def in_progress(folder):
    """Whether a live process is running the run in ``folder`` (it holds the lock on run.json)."""
    try:
        fd = lock_file(Path(folder) / "run.json")
    except OSError:
        return False
    if fd is None:
        return True
    os.close(fd)
    return False


def check_run_id(run_id):
    """``--run-id`` names one folder under ``<trainer.save_dir>/<name>``: not empty, not a path."""
    if run_id is not None and (not run_id.strip() or run_id in (".", "..") or "/" in run_id or os.sep in run_id):
        raise ObserverError(f"--run-id {run_id!r}: expected a folder name (not empty, no '/', not '.' or '..')")


def run_root_of(checkpoint):
    """The folder that holds the run folder of ``checkpoint`` when it is a run's latest.pt (beside
    its run.json), wherever that folder was moved or copied; else None."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.name == RESUMABLE and (checkpoint.parent / "run.json").is_file():
        return checkpoint.parent.parent
    return None


def continued_run_id(checkpoint, run_root, run_id=None):
    """The id of the run that resuming from ``checkpoint`` continues in its own folder, or None
    when the resumed run is a new run.

    It continues in place when the checkpoint is the latest.pt of a run folder directly under
    ``run_root`` (the resumed config's ``<trainer.save_dir>/<name>``), that run did not complete,
    and ``run_id`` is unset or names that folder. Any other checkpoint (an epoch checkpoint, one of
    a completed run, one from elsewhere) starts a new run, as does an explicit other ``run_id``.
    """
    checkpoint = Path(checkpoint).resolve()
    folder = checkpoint.parent
    if checkpoint.name != RESUMABLE or folder.parent != Path(run_root).resolve():
        return None
    if run_id is not None and run_id != folder.name:
        return None
    status = run_status(folder)
    return folder.name if status is not None and status != "COMPLETED" else None


# What a run folder holds, by ``folder_state``, and what ``train.py -c CONFIG --run-id ID`` does with it:
STATES = {
    "new": "no folder yet: train",
    "finished": "run.json says COMPLETED: reused if it ran the same config, refused otherwise",
    "busy": "another process is running it: refused",
    "resume": "did not finish and has a latest.pt: resumed in place if it ran the same config, refused otherwise",
    "rerun": "did not finish and wrote no checkpoint (failed before training): replaced",
    "weights": "a latest.pt without run.json: converted or provided weights, not a run (refused)",
    "foreign": "a folder with neither run.json nor latest.pt: not a run of this project (refused)",
}


def folder_state(folder):
    """One of ``STATES`` for the run folder ``folder``."""
    folder = Path(folder)
    if not folder.exists():
        return "new"
    has_record = (folder / "run.json").is_file()
    has_checkpoint = (folder / RESUMABLE).is_file()
    if not has_record:
        return "weights" if has_checkpoint else "foreign"
    if run_status(folder) == "COMPLETED":
        return "finished"
    if in_progress(folder):
        return "busy"
    return "resume" if has_checkpoint else "rerun"


def existing_run(folder, config):
    """What the run folder ``folder`` holds for a command that would train ``config`` in it:
    "finished" (a finished run of this config: there is nothing to train), "resume" (an unfinished
    run of this config with a latest.pt: it continues in place), or None (nothing of that kind:
    train, and ``check_writable`` judges the folder). A finished or unfinished run of another
    config, outside the keys that change no result, is a one-line ConfigError naming what
    differs, so that a repeated command never passes off another run's results as its own."""
    from parse_config import config_differences  # torch: not needed by the state command
    folder = Path(folder)
    state = folder_state(folder)
    if state not in ("finished", "resume"):
        return None
    what = "finished" if state == "finished" else "unfinished"
    try:
        recorded = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{folder}: {what} run whose config.json cannot be read to compare with this "
                          "config; remove the folder or pick another --run-id") from None
    changed = config_differences(recorded, config)
    if changed:
        shown = "; ".join(f"{key}: {json.dumps(old)} in the run, {json.dumps(new)} now" for key, old, new in changed[:3])
        more = f"; {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(f"{folder}: {what} run of another config ({shown}{more}); remove the folder "
                          "or pick another --run-id")
    return state


# ---- observers -----------------------------------------------------------------------------------

class RunFolderObserver(FileStorageObserver):
    """Sacred's FileStorageObserver that can continue an unfinished run in its own folder
    (``continue_id``), and that locks run.json for as long as its run lives."""

    def __init__(self, basedir, continue_id=None):
        super().__init__(basedir)
        self.continue_id = continue_id
        self._lock = None
        self._earlier = None     # run.json of the attempt this one continues
        self._reconciled = set()  # series already cut at the first step this attempt logged

    def _make_run_dir(self, _id):
        if self.continue_id is None or _id != self.continue_id:
            super()._make_run_dir(_id)
            self._lock = lock_file(os.path.join(self.dir, "run.json"), create=True)
            return
        folder = os.path.join(self.basedir, str(_id))
        self._lock = lock_file(os.path.join(folder, "run.json"))
        if self._lock is None:
            raise ObserverError(f"{folder}: its run is in progress in another process")
        with open(os.path.join(folder, "run.json")) as f:
            self._earlier = json.load(f)
        self.dir = folder

    def started_event(self, *args, **kwargs):
        _id = super().started_event(*args, **kwargs)
        if self._earlier is not None:
            self.run_entry["earlier_attempts"] = _attempts(self._earlier)
            self.save_json(self.run_entry, "run.json")
        return _id

    def log_metrics(self, metrics_by_name, info):
        if self._earlier is not None:
            self._drop_redone_steps(metrics_by_name)
        super().log_metrics(metrics_by_name, info)

    def _drop_redone_steps(self, metrics_by_name):
        first = _first_new_steps(metrics_by_name, self._reconciled)
        if not first:
            return
        path = os.path.join(self.dir, "metrics.json")
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return
        for name, step in first.items():
            if saved.get(name):
                saved[name].update(_before_step(saved[name], step))
        self.save_json(saved, "metrics.json")

    def _release(self):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def completed_event(self, *args, **kwargs):
        try:
            super().completed_event(*args, **kwargs)
        finally:
            self._release()

    def interrupted_event(self, *args, **kwargs):
        try:
            super().interrupted_event(*args, **kwargs)
        finally:
            self._release()

    def failed_event(self, *args, **kwargs):
        try:
            if self.dir is not None and self.run_entry is not None:
                super().failed_event(*args, **kwargs)
        finally:
            self._release()


def _attempts(earlier):
    """The ``earlier_attempts`` of a run that continues the run recorded in ``earlier``."""
    attempt = {k: earlier.get(k) for k in ("start_time", "stop_time", "heartbeat", "status")}
    if attempt["status"] == "RUNNING":  # no process held its lock: it was killed (its heartbeat: when)
        attempt["status"] = "DIED"
    attempt["host"] = (earlier.get("host") or {}).get("hostname")
    return earlier.get("earlier_attempts", []) + [attempt]


def _first_new_steps(metrics_by_name, reconciled):
    """{series: first step} of the series a continued attempt logs for the first time (added to
    ``reconciled``): the saved values of those series from that step on were redone."""
    first = {name: min(m["steps"]) for name, m in metrics_by_name.items() if name not in reconciled and m["steps"]}
    reconciled.update(first)
    return first


def _before_step(series, step):
    """The steps, values and timestamps of a metric series logged before ``step``."""
    keep = [i for i, s in enumerate(series["steps"]) if s < step]
    return {key: [series[key][i] for i in keep] for key in ("steps", "values", "timestamps")}


class RunRecordObserver(MongoObserver):
    """Sacred's MongoObserver for run folders. The run folder names the run: this observer comes
    after RunFolderObserver (lower priority) and gives each record the database's next integer id,
    so folders of different experiments that share a name ("1", "seed0") never share a record; the
    record names its folder (``run_folder``). A run that continues in its folder updates the record
    of its unfinished attempt, as RunFolderObserver updates run.json: the attempt is listed under
    ``earlier_attempts`` (with its console output) and the metric values of redone steps are replaced."""

    def __init__(self, url, run_root, continue_run=False):
        super().__init__(url=url, priority=DEFAULT_FILE_STORAGE_PRIORITY - 1)
        self.run_root, self.continue_run = Path(run_root), continue_run
        self._folder = self._earlier = None
        self._reconciled = set()

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        self._folder = str(self.run_root / str(_id))
        if self.continue_run:
            self._earlier = self.runs.find_one({"run_folder": self._folder}, sort=[("start_time", -1)])
        return super().started_event(ex_info, command, host_info, start_time, config, meta_info,
                                     _id=self._earlier["_id"] if self._earlier else None)

    def insert(self):
        self.run_entry["run_folder"] = self._folder
        if self._earlier is None:
            return self._insert_new()
        self.run_entry["earlier_attempts"] = _attempts(self._earlier)
        self.run_entry["earlier_attempts"][-1]["captured_out"] = self._earlier.get("captured_out")
        self.runs.replace_one({"_id": self._earlier["_id"]}, self.run_entry)

    def _insert_new(self):
        """Insert under 1 + the largest integer id. Sacred's own count takes the largest id of any
        type, and fails on a string one (a Sacred run given ``--id NAME`` in the same database)."""
        import pymongo.errors
        while True:
            last = self.runs.find_one({"_id": {"$type": "number"}}, sort=[("_id", -1)])
            self.run_entry["_id"] = int(last["_id"]) + 1 if last else 1
            try:
                return super().insert()
            except pymongo.errors.DuplicateKeyError:
                pass  # another run took that id meanwhile

    def log_metrics(self, metrics_by_name, info):
        if self._earlier is not None:
            self._drop_redone_steps(metrics_by_name, info)
        super().log_metrics(metrics_by_name, info)

    def _drop_redone_steps(self, metrics_by_name, info):
        for name, step in _first_new_steps(metrics_by_name, self._reconciled).items():
            saved = self.metrics.find_one({"run_id": self.run_entry["_id"], "name": name})
            if saved is None:
                continue
            self.metrics.update_one({"_id": saved["_id"]}, {"$set": _before_step(saved, step)})
            # The series exists already, so the base class does not reference it in the run's info.
            info.setdefault("metrics", []).append({"name": name, "id": str(saved["_id"])})


def _neptune_observer():
    try:
        from neptune.integrations.sacred import NeptuneObserver
        import neptune
    except ImportError:
        raise ObserverError("-n/--neptune needs the optional neptune package: "
                            "pip install neptune neptune-sacred") from None
    return NeptuneObserver(run=neptune.init_run())


def run_experiment(name, config, main, run_root, run_id=None, mongo=None, neptune=False, continue_run=False):
    """Run ``main(config, run)`` as a Sacred experiment observed into ``run_root``; return its result.

    ``config`` is plain JSON-like data; ``run_dir(run)`` is the run folder. ``continue_run``: the
    existing folder ``run_root/run_id`` holds an unfinished run that this one continues (see
    ``continued_run_id``). Under torch.distributed only rank 0 records the run; the other ranks
    run the same experiment unobserved, and learn from rank 0 whether the run folder can be written.
    """
    from common.distributed import on_main, rank  # torch: not needed by the folder-state command

    ex = Experiment(name, base_dir=str(ROOT), save_git_info=False)
    entry = getattr(sys.modules.get("__main__"), "__file__", None)  # train.py / test.py: not a module name
    if entry and Path(entry).resolve().is_relative_to(ROOT):
        ex.add_source_file(entry)
    for package in RECORDED_PACKAGES:  # added directly: add_package_dependency refuses "2.13.0+cpu"
        ex.dependencies.add(PackageDependency(package, importlib.metadata.version(package)))
    ex.add_config(config)
    on_main(lambda: check_writable(run_root, run_id, continue_run))
    folder_observer = None
    if rank() == 0:
        folder_observer = RunFolderObserver(str(run_root), continue_id=run_id if continue_run else None)
        ex.observers.append(folder_observer)
        if mongo:
            ex.observers.append(RunRecordObserver(mongo, run_root, continue_run))  # pymongo: in requirements
        if neptune:
            ex.observers.append(_neptune_observer())

    started = []

    @ex.main
    def _main(_run, _config):
        started.append(True)
        try:
            return main(json.loads(json.dumps(_config)), _run)  # Sacred hands out read-only containers
        finally:
            # Sacred (0.8.7) collects the captured console output on heartbeats and after a main that
            # returned, so a run that was interrupted or failed lost what it printed since the last
            # heartbeat; collected here, its last heartbeat writes it to cout.txt.
            _run._get_captured_output()

    # Failures are reported by the entry points in one line (and recorded in run.json by the
    # observer); Sacred's own log lines would repeat them.
    options = {"--loglevel": "CRITICAL"}
    if run_id is not None:
        options["--id"] = run_id
    try:
        run = ex.run(options=options)
    except OSError as e:
        if started or folder_observer is None:
            raise
        raise _unrecorded(folder_observer, run_root, continue_run, e) from None
    return run.result


def _unrecorded(observer, run_root, continue_run, error):
    """The ObserverError of a run whose folder could not be written before it started (a full disk,
    a quota): it names the run folder, and a new folder is removed, so that the same command can be
    repeated."""
    observer._release()
    folder = Path(observer.dir) if observer.dir else Path(run_root)
    if observer.dir and not continue_run:
        shutil.rmtree(folder, ignore_errors=True)
    return ObserverError(f"{folder}: cannot record the run ({error.strerror or error}); nothing was trained")


def check_writable(run_root, run_id=None, continue_run=False):
    """Fail before anything runs when the run folder cannot be created or written, or, for a run
    that continues in its folder, when another process is running it. A named run folder whose run
    failed before writing a checkpoint (a missing file, a wrong setting) is replaced, so that the
    corrected command can be run again as it was."""
    run_root = Path(run_root)
    folder = run_root / run_id if run_id is not None else None
    if continue_run:
        if in_progress(folder):
            raise ObserverError(f"{folder}: its run is in progress in another process")
    elif folder is not None and folder.exists():
        state = folder_state(folder)
        if state == "busy":
            raise ObserverError(f"{folder}: its run is in progress in another process")
        if state == "resume":
            raise ObserverError(f"{folder}: its run did not finish; resume it with: python train.py -r "
                                f"{folder / RESUMABLE}")
        if state != "rerun":
            raise ObserverError(f"{folder}: run folder exists; pick another --run-id or remove it")
        print(f"replacing {folder}: its run ({run_status(folder)}) stopped before writing a checkpoint")
        shutil.rmtree(folder)
    try:
        run_root.mkdir(parents=True, exist_ok=True)
        probe = run_root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ObserverError(f"{run_root}: cannot write run folders here ({e.strerror or e})") from None


def run_dir(run):
    """The run folder: the file-storage observer's (other observers may sort before it)."""
    return Path(next(o for o in run.observers if isinstance(o, FileStorageObserver)).dir)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "state":
        print("usage: python -m trainer.experiment state RUN_FOLDER\n"
              "prints one of: " + "; ".join(f"{k} ({v})" for k, v in STATES.items()), file=sys.stderr)
        return 2
    print(folder_state(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
