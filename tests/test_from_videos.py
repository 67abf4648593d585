"""scripts/from_videos/run.sh end to end, through the command lines, with tiny models."""
import json
import os
import subprocess
from pathlib import Path

from data_loader.readers import read_safe
from data_loader.video import synthetic_frames, write_video
from tests.test_translate import WORDS, english
from utils.tiny_encoders import build_tiny_clip, build_tiny_translator

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_from_videos_to_the_table(tmp_path, toy_assets):
    """scripts/from_videos/run.sh end to end with tiny models: extract (one video is corrupt), translate,
    check, a translate-train teacher, a C2KD student and the per-language table."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(10):
        write_video(videos / f"clip{i}.mp4", synthetic_frames(8 + i, 32, 40, seed=i), 8)
    (videos / "clip10.mp4").write_bytes(b"not a video")
    captions = {"train": {f"clip{i}": c for i, c in zip(range(6), english(6, 3))},
                "eval": {f"clip{i}": c for i, c in zip(range(6, 11), english(5, 4))}}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    build_tiny_clip(tmp_path / "tiny-clip", image_size=32)
    for lang in ("de", "sw"):
        build_tiny_translator(tmp_path / f"tiny-mt-en-{lang}", [" ".join(WORDS)], languages=(lang,), steps=0)
    env = {**os.environ, "ENCODER_MODEL": str(tmp_path / "tiny-clip"), "MT_MODEL": str(tmp_path / "tiny-mt-en-{lang}"),
           "LANGUAGES": "de sw", "TEACHER": str(toy_assets["encoders"]["xlmr-tiny"]),
           "STUDENT": str(toy_assets["encoders"]["labse-tiny"]), "EXTRACT_ARGS": "--fps 4 --size 32 --workers 1",
           "TRANSLATE_ARGS": "--num-beams 1 --max-new-tokens 6",
           "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest, more only wait on each other
    out = tmp_path / "out"
    small = ["-d", "cpu", "--set", "trainer.epochs=1", "--set", "trainer.max_steps_per_epoch=2", "--set",
             "data.batch_size=3", "--set", "model.width=32", "--set", "model.depth=1", "--set", "model.heads=2"]
    result = subprocess.run(["bash", "scripts/from_videos/run.sh", str(videos), str(tmp_path / "captions.json"),
                             str(out), *small], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "== some videos failed" in result.stdout
    assert (out / "data" / "failed.tsv").read_text().startswith("clip10\tcannot decode")
    evaluation = read_safe(out / "data" / "eval")
    assert evaluation.ids == ["clip6", "clip7", "clip8", "clip9"] and evaluation.languages == ["en", "de", "sw"]
    assert evaluation.feature_dim == 16  # the tiny CLIP's projection
    for run in ("teacher", "c2kd"):
        record = json.loads((out / "runs" / run / "seed0" / "run.json").read_text())
        assert record["status"] == "COMPLETED" and "t2v" in json.dumps(record["result"])
    config = json.loads((out / "runs" / "c2kd" / "seed0" / "config.json").read_text())
    assert config["stage"] == "c2kd" and config["data"]["layout"] == "safe"
    table = (out / "report" / "table.csv").read_text()
    assert "Translate-train teacher" in table and "C2KD" in table
    header = (out / "report" / "table.md").read_text()
    assert "| en | de | sw |" in header
