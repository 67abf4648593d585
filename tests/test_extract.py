"""data_loader.extract and the S3D network: features equal the models' own outputs on the same decoded
frames, the published S3D layout loads, bad videos are reported, an interrupted run resumes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_loader import extract
from data_loader.s3d import S3D, S3DWeightsError, load_s3d
from data_loader.video import center_crop, decode_frames, synthetic_frames, write_video
from utils.tiny_encoders import build_tiny_clip

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # frames and the tiny CLIP's input, in pixels
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", image_size=SIZE)


def make_videos(folder, lengths, fps=8, height=SIZE, width=40):
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(lengths):
        write_video(folder / f"video{i}.mp4", synthetic_frames(n, height, width, seed=i), fps)
    return folder


def test_clip_features_are_the_models_image_embeddings_of_the_decoded_frames(tmp_path, clip_model):
    from transformers import AutoImageProcessor, CLIPModel
    videos = make_videos(tmp_path / "videos", [12, 16])
    out = tmp_path / "out"
    args = [str(videos), str(out), "--model", str(clip_model), "--fps", "4", "--size", str(SIZE), "--workers", "0",
            "--batch-size", "5"]  # batches that straddle the two videos
    assert extract.main(args) == 0
    processor = AutoImageProcessor.from_pretrained(clip_model, backend="pil")
    model = CLIPModel.from_pretrained(clip_model).eval()
    for name, n in (("video0", 12), ("video1", 16)):
        features = np.load(out / "features" / f"{name}.npy")
        frames = decode_frames(videos / f"{name}.mp4", fps=4, size=SIZE)
        assert len(features) == len(frames) == n // 2  # 8 fps source sampled at 4 fps
        for k in (0, len(frames) - 1):
            pixels = processor(images=[frames[k]], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                expected = model.get_image_features(pixel_values=pixels).pooler_output[0].numpy()
            np.testing.assert_allclose(features[k], expected, rtol=0, atol=1e-5)
    assert json.loads((out / "extract.json").read_text())["fps"] == 4
    # Other settings for the same output folder are refused in one line, before anything is decoded.
    assert extract.main(args[:-4] + ["--fps", "2", "--workers", "0"]) == 2


# The published s3d_howto100m.pth, key by key, written out from the published architecture: the stem,
# nine gated Inception blocks (output channels of branches 0, 1a, 1b, 2a, 2b, 3) and the joint-space heads.
PUBLISHED_INCEPTION = [
    ("mixed_3b", 192, (64, 96, 128, 16, 32, 32)), ("mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("mixed_4b", 480, (192, 96, 208, 16, 48, 64)), ("mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("mixed_4d", 512, (128, 128, 256, 24, 64, 64)), ("mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("mixed_4f", 528, (256, 160, 320, 32, 128, 128)), ("mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
]


def published_s3d_layout():
    layout = {}

    def conv(prefix, cin, cout, kernel, separable=False):
        def norm(name):
            for p in ("weight", "bias", "running_mean", "running_var"):
                layout[f"{prefix}.{name}.{p}"] = (cout,)
            layout[f"{prefix}.{name}.num_batches_tracked"] = ()
        if separable:
            layout[f"{prefix}.conv1.weight"] = (cout, cin, 1, kernel, kernel)
            norm("bn1")
            layout[f"{prefix}.conv2.weight"] = (cout, cout, kernel, 1, 1)
            norm("bn2")
        else:
            layout[f"{prefix}.conv1.weight"] = (cout, cin, *kernel)
            norm("bn1")

    def gate(prefix, c):
        layout[f"{prefix}.fc.weight"], layout[f"{prefix}.fc.bias"] = (c, c), (c,)

    conv("conv1", 24, 64, (2, 4, 4))
    conv("conv_2b", 64, 64, (1, 1, 1))
    conv("conv_2c", 64, 192, 3, separable=True)
    gate("gating", 192)
    for name, cin, (b0, b1a, b1b, b2a, b2b, b3) in PUBLISHED_INCEPTION:
        conv(f"{name}.conv_b0", cin, b0, (1, 1, 1))
        conv(f"{name}.conv_b1_a", cin, b1a, (1, 1, 1))
        conv(f"{name}.conv_b1_b", b1a, b1b, 3, separable=True)
        conv(f"{name}.conv_b2_a", cin, b2a, (1, 1, 1))
        conv(f"{name}.conv_b2_b", b2a, b2b, 3, separable=True)
        conv(f"{name}.conv_b3_b", cin, b3, (1, 1, 1))
        for i, c in enumerate((b0, b1b, b2b, b3)):
            gate(f"{name}.gating_b{i}", c)
    layout.update({"fc.weight": (512, 1024), "fc.bias": (512,), "text_module.word_embd.weight": (66250, 300),
                   "text_module.fc1.weight": (2048, 300), "text_module.fc1.bias": (2048,),
                   "text_module.fc2.weight": (512, 2048), "text_module.fc2.bias": (512,)})
    return layout


def random_state(layout, seed=0):
    """Random tensors of ``layout``, scaled so that a signal passes through the network (He init)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        noise = torch.randn(shape, generator=g)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith(("running_var", ".bn1.weight", ".bn2.weight")):
            state[key] = 1 + 0.1 * noise.abs()
        elif len(shape) > 1:
            state[key] = noise * (2 / np.prod(shape[1:])) ** 0.5
        else:
            state[key] = 0.1 * noise
    return state


@pytest.fixture(scope="module")
def s3d_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("s3d") / "s3d_howto100m.pth"
    torch.save(random_state(published_s3d_layout()), path)
    return path


@pytest.fixture(scope="module")
def s3d_model(s3d_weights):
    return load_s3d(s3d_weights)


def test_s3d_loads_every_published_key_and_is_deterministic_across_runs_and_batch_sizes(s3d_weights, s3d_model):
    state = torch.load(s3d_weights, weights_only=True)
    for key, value in s3d_model.state_dict().items():
        assert torch.equal(value, state[key]), key  # each published tensor went where its name says
    clips = torch.rand(2, 3, 8, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = s3d_model(clips)
        again = s3d_model(clips)
        alone = s3d_model(clips[1:])
    assert batch.shape == (2, 1024) and torch.isfinite(batch).all()
    assert torch.equal(batch, again)
    torch.testing.assert_close(alone, batch[1:], rtol=0, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])  # different clips, different features


def test_s3d_refuses_another_layout_in_one_line(tmp_path):
    layout = published_s3d_layout()
    for name, change in (("missing", lambda s: s.pop("mixed_4d.conv_b1_b.conv2.weight")),
                         ("shape", lambda s: s.__setitem__("fc.weight", torch.zeros(512, 832))),
                         ("extra", lambda s: s.__setitem__("module.fc.weight", torch.zeros(1)))):
        # The keys are checked before the shapes, and fc.weight before the word embedding: a small stand-in
        # for the latter (66250 x 300) keeps the files small.
        state = {k: torch.zeros(v) for k, v in layout.items() if k != "text_module.word_embd.weight"}
        state["text_module.word_embd.weight"] = torch.zeros(1)
        change(state)
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        with pytest.raises(S3DWeightsError) as e:
            load_s3d(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        assert {"missing": "missing key 'mixed_4d.conv_b1_b.conv2.weight'", "shape": "'fc.weight' has shape",
                "extra": "unexpected key 'module.fc.weight'"}[name] in str(e.value)
    # A file saved without BatchNorm's step counters loads (they do not change the output).
    state = {k: torch.zeros(v) for k, v in layout.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "no_counters.pth")
    assert isinstance(load_s3d(tmp_path / "no_counters.pth"), S3D)


def test_s3d_extraction_gives_the_networks_features_of_each_clip_and_reports_short_videos(tmp_path, s3d_weights,
                                                                                         s3d_model):
    videos = make_videos(tmp_path / "videos", [12, 6])  # video1 is shorter than one 8-frame clip
    out = tmp_path / "out"
    args = [str(videos), str(out), "--encoder", "s3d", "--model", str(s3d_weights), "--fps", "8", "--size",
            str(SIZE), "--clip-frames", "8", "--clip-stride", "4", "--workers", "0", "--batch-size", "2"]
    assert extract.main(args) == 1
    assert (out / "failed.tsv").read_text().startswith("video1\ttoo short: 6 frames at 8 fps, one clip needs 8")
    assert not (out / "features" / "video1.npy").exists()
    features = np.load(out / "features" / "video0.npy")
    assert features.shape == (2, 1024)  # clips start at frames 0 and 4 (stride 4) of 12
    frames = center_crop(decode_frames(videos / "video0.mp4", fps=8, size=SIZE), SIZE)
    last = torch.from_numpy(frames[4:12].copy()).permute(3, 0, 1, 2)[None] / 255.0
    with torch.no_grad():
        np.testing.assert_allclose(features[-1], s3d_model(last.float())[0].numpy(), rtol=0, atol=1e-5)


def _cli(args, drop_read_permission=False):
    """``python -m data_loader.extract ARGS`` as a process; with ``drop_read_permission``, one that file
    permissions apply to even when the tests run as root."""
    command = [sys.executable, "-m", "data_loader.extract", *args]
    if drop_read_permission and os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: permissions cannot be made to apply")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *command]
    return command


def test_bad_videos_are_reported_and_an_interrupted_run_resumes_without_recomputing(tmp_path, clip_model):
    videos = make_videos(tmp_path / "videos", [8, 10, 12])
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(300))  # an MP4 header, then noise
    locked = videos / "locked"
    locked.mkdir()
    write_video(locked / "hidden.mp4", synthetic_frames(8, SIZE, SIZE), 8)
    locked.chmod(0)
    # video3 is a pipe: decoding blocks on it until the test writes into it, so the run is surely
    # stopped while it waits there, after the videos before it were written.
    os.mkfifo(videos / "video3.mp4")
    (videos / "loop").symlink_to(videos)  # listed once, not forever
    out = tmp_path / "out"
    args = [str(videos), str(out), "--model", str(clip_model), "--fps", "4", "--size", str(SIZE), "--workers", "1",
            "--batch-size", "1"]
    # One thread each: the tiny CLIP gains nothing from more, and the processes share the machine.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    try:
        run = subprocess.Popen(_cli(args, drop_read_permission=True), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        done = [out / "features" / f"video{i}.npy" for i in range(3)]
        deadline = time.monotonic() + 120
        while not all(p.exists() for p in done) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(p.exists() for p in done), run.communicate()[0] if run.poll() is not None else "timed out"
        stamps = {p: p.stat().st_mtime_ns for p in done}
        run.send_signal(signal.SIGTERM)
        first = run.communicate(timeout=60)[0]
        assert run.returncode == 128 + signal.SIGTERM, first
        assert not (out / "features" / "video3.npy").exists()
        assert not list((out / "features").glob(".*.tmp"))  # nothing half-written left behind

        os.unlink(videos / "video3.mp4")
        write_video(videos / "video3.mp4", synthetic_frames(8, SIZE, 40, seed=3), 8)
        second = subprocess.run(_cli(args, drop_read_permission=True), cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
    finally:
        locked.chmod(0o755)
    assert second.returncode == 1, second.stdout + second.stderr
    lines = second.stdout.strip().splitlines()
    assert lines[0].startswith("5 videos in") and "3 already extracted, 2 to do" in lines[0], lines
    assert lines[-1].startswith("extracted 1 videos, 3 were already done, 2 failed"), lines
    assert {p: p.stat().st_mtime_ns for p in done} == stamps  # finished videos were not recomputed
    assert np.load(out / "features" / "video3.npy").shape == (4, 16)
    report = dict(line.split("\t") for line in (out / "failed.tsv").read_text().splitlines())
    assert set(report) == {"broken", str(locked)}, report
    assert report["broken"].startswith("cannot decode") and "Permission denied" in report[str(locked)]


def test_a_missing_folder_or_model_is_one_line_with_status_2(tmp_path, capsys, clip_model):
    assert extract.main([str(tmp_path / "nowhere"), str(tmp_path / "out"), "--model", str(clip_model)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: not a folder of videos"
    videos = make_videos(tmp_path / "videos", [8])
    assert extract.main([str(videos), str(tmp_path / "out"), "--model", str(tmp_path / "no-model"),
                         "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no-model': no such folder" in err and "\n" not in err
    assert extract.main([str(videos), str(tmp_path / "out"), "--model", str(clip_model), "--clip-frames", "8"]) == 2
    assert capsys.readouterr().err.strip() == "error: --clip-frames applies to another encoder, not to --encoder clip"


@pytest.fixture
def alarm():
    """A hang (a pool restarting its workers forever) fails the test after 60 s instead of stalling the run."""
    def timeout(*_):
        raise TimeoutError("timed out")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_processor_that_cannot_load_is_one_line_with_decoding_workers_too(tmp_path, capsys, clip_model, alarm):
    no_processor = tmp_path / "no-processor"
    shutil.copytree(clip_model, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    videos = make_videos(tmp_path / "videos", [8])
    errors = []
    for workers in ("0", "1"):
        assert extract.main([str(videos), str(tmp_path / "out"), "--model", str(no_processor),
                             "--workers", workers]) == 2
        errors.append(capsys.readouterr().err.strip())
    assert errors[0] == errors[1] and errors[0].startswith("error: image processor") and "\n" not in errors[0]


def test_a_failed_first_run_leaves_the_folder_free_and_sizes_and_strides_follow_their_sources(tmp_path, capsys,
                                                                                            clip_model):
    videos = make_videos(tmp_path / "videos", [8])
    out = tmp_path / "out"
    broken = tmp_path / "broken-clip"  # a processor but no weights: it fails when the encoder loads
    broken.mkdir()
    shutil.copy(clip_model / "preprocessor_config.json", broken)
    assert extract.main([str(videos), str(out), "--model", str(broken), "--fps", "4", "--workers", "0"]) == 2
    assert "error: CLIP model" in capsys.readouterr().err
    assert extract.main([str(videos), str(out), "--model", str(clip_model), "--fps", "4", "--workers", "0"]) == 0
    settings = json.loads((out / "extract.json").read_text())
    assert settings["size"] == SIZE  # the image processor's size, not a fixed 224
    assert settings["model"] == str(clip_model.resolve())
    # S3D: one clip per second unless --clip-stride is given.
    assert extract.S3DClipFeatures("m", fps=8.0, size=SIZE, clip_frames=8, clip_stride=None).clip_stride == 8
    assert extract.S3DClipFeatures("m", fps=8.0, size=SIZE, clip_frames=8, clip_stride=3).clip_stride == 3


@pytest.mark.parametrize("split", ["..", ".", ".hidden", "extract.json", "failed.tsv", "features", "a/b", "a\\b"])
def test_a_split_name_outside_the_output_folder_or_on_its_files_is_refused(tmp_path, capsys, split):
    videos = make_videos(tmp_path / "videos", [])
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"train": {"video0": ["a cat"]}, split: {"video0": ["a dog"]}}))
    assert extract.main([str(videos), str(tmp_path / "out"), "--model", "none", "--captions", str(captions)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {captions}: '{split}' cannot name a split") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_two_videos_with_one_id_are_refused_before_any_work(tmp_path, capsys):
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    for name in ("a.mp4", "a.avi", "sub/b.mp4"):
        (videos / name).write_bytes(b"")
    assert extract.main([str(videos), str(tmp_path / "out"), "--model", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {videos}: {videos / 'a.avi'} and {videos / 'a.mp4'} have the same video id 'a'; "
                   "rename or move one of them")
    assert not (tmp_path / "out").exists()


def test_decoding_workers_stay_a_bounded_number_of_videos_ahead(tmp_path):
    pulled = []

    def jobs():
        for i in range(40):
            pulled.append(i)
            yield f"v{i}", tmp_path / f"missing{i}.mp4"  # fails at once: the workers are never the bottleneck

    encoder = extract.S3DClipFeatures("unused", fps=8.0, size=SIZE, clip_frames=8, clip_stride=None)
    with extract.decoding(encoder, workers=2) as prepare_all:
        results = prepare_all(jobs())
        first = next(results)
        time.sleep(0.5)  # time for a pool that reads ahead to take every job
        ahead = len(pulled)
        rest = list(results)
    assert first[0] == "v0" and [r[0] for r in rest] == [f"v{i}" for i in range(1, 40)]
    assert all(r[1] is None and r[2] for r in [first, *rest])
    assert ahead <= 2 * 2 + 1, ahead
