"""``--mongo``: the run records that Sacred's MongoObserver writes, as this project sets it up, in
mongomock's in-memory implementation of the pymongo API (no MongoDB server runs here)."""
import json

import mongomock
import mongomock.gridfs
import pymongo
import pytest

from trainer.experiment import run_experiment

URL = "mongodb://sacred-db.test:27017"


@pytest.fixture
def database():
    mongomock.gridfs.enable_gridfs_integration()
    with mongomock.patch(servers=(("sacred-db.test", 27017),)):
        yield pymongo.MongoClient(URL)["sacred"]


def logs_steps(steps, fail=False):
    """A run's main function that logs ``loss`` = step at each step, then fails or returns."""
    def main(config, run):
        for step in steps:
            run.log_scalar("loss", float(step), step)
        print(f"attempt over steps {steps}")
        if fail:
            raise RuntimeError("stopped")
        return "done"
    return main


def test_run_folders_name_the_runs_and_records_never_collide(database, tmp_path):
    for name in ("teacher", "student"):
        run_experiment(name, {"seed": 0}, logs_steps([1]), tmp_path / name, mongo=URL)
    run_experiment("student", {"seed": 1}, logs_steps([1]), tmp_path / "student", run_id="seed1", mongo=URL)
    # The run folders are numbered by the folder observer (or named by --run-id), not by the database.
    assert sorted(p.parent.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/*/run.json")) == [
        "student/1", "student/seed1", "teacher/1"]
    records = {r["run_folder"]: r for r in database.runs.find()}
    assert set(records) == {str(tmp_path / f) for f in ("teacher/1", "student/1", "student/seed1")}
    assert sorted(r["_id"] for r in records.values()) == [1, 2, 3]
    assert all(r["status"] == "COMPLETED" for r in records.values())
    assert database.metrics.count_documents({}) == 3


def test_a_run_continued_in_its_folder_updates_its_record(database, tmp_path):
    root = tmp_path / "c2kd"
    with pytest.raises(RuntimeError, match="stopped"):
        run_experiment("c2kd", {"seed": 0}, logs_steps([1, 2, 3], fail=True), root, run_id="seed0", mongo=URL)
    (first,) = database.runs.find()
    assert first["status"] == "FAILED"
    # The continued attempt redoes step 3, whose value it replaces, and goes on.
    assert run_experiment("c2kd", {"seed": 0}, logs_steps([3, 4]), root, run_id="seed0", mongo=URL,
                          continue_run=True) == "done"
    (record,) = database.runs.find()
    assert record["_id"] == first["_id"] and record["run_folder"] == str(root / "seed0")
    assert record["status"] == "COMPLETED"
    (earlier,) = record["earlier_attempts"]
    assert earlier["status"] == "FAILED" and "attempt over steps [1, 2, 3]" in earlier["captured_out"]
    assert "attempt over steps [3, 4]" in record["captured_out"]
    (loss,) = database.metrics.find({"run_id": record["_id"]})
    assert loss["steps"] == [1, 2, 3, 4] and loss["values"] == [1.0, 2.0, 3.0, 4.0]
    assert len(loss["timestamps"]) == 4
    assert record["info"]["metrics"] == [{"name": "loss", "id": str(loss["_id"])}]
    # The run folder tells the same story.
    run_json = json.loads((root / "seed0" / "run.json").read_text())
    assert run_json["status"] == "COMPLETED" and [a["status"] for a in run_json["earlier_attempts"]] == ["FAILED"]


def test_records_get_the_next_integer_id_beside_records_named_by_strings(database, tmp_path):
    """A database shared with other Sacred experiments may hold records with string ids (Sacred's
    ``--id NAME``); Sacred's own count would stop at them."""
    database.runs.insert_one({"_id": "someone-elses-run", "status": "COMPLETED"})
    database.runs.insert_one({"_id": 7, "status": "COMPLETED"})
    run_experiment("teacher", {"seed": 0}, logs_steps([1]), tmp_path / "teacher", mongo=URL)
    run_experiment("teacher", {"seed": 1}, logs_steps([1]), tmp_path / "teacher", run_id="seed1", mongo=URL)
    records = {r["run_folder"]: r["_id"] for r in database.runs.find({"run_folder": {"$exists": True}})}
    assert records == {str(tmp_path / "teacher/1"): 8, str(tmp_path / "teacher/seed1"): 9}
