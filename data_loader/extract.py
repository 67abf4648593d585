"""Extract per-frame (CLIP) or per-clip (S3D) video features from a folder of videos.

    python -m data_loader.extract VIDEOS OUT --encoder clip --model openai/clip-vit-base-patch32 \\
        --captions captions_en.json
    python -m data_loader.extract VIDEOS OUT --encoder s3d --model s3d_howto100m.pth --captions captions_en.json

Worker processes decode the videos with PyAV and prepare the model inputs; the main process runs
the encoder in batches (on the GPU when there is one) and writes each video's features to
OUT/features/<video id>.npy, whole or not at all. A re-run skips the videos whose file exists, so
an interrupted run continues where it stopped. A video that cannot be decoded, or is shorter than
one clip, is skipped and listed in OUT/failed.tsv; the exit status is then 1 and the last line
says how many failed. With --captions (a JSON object {split: {video id: [English captions]}}),
each split is then written as a safe-layout folder OUT/<split> (captions.json and
features.safetensors) of the videos that have features, ready for data_loader.check,
data_loader.translate and train.py. See docs/datasets.md for what is known of the released
features' recipe and the defaults that follow from it.
"""
import argparse
import collections
import contextlib
import json
import multiprocessing
import signal
import sys
from pathlib import Path

import numpy as np

from data_loader.corpus import ENGLISH, Corpus, read_safe_raw, safe_files
from data_loader.readers import caption_list
from data_loader.safe_pickle import DataFileError
from data_loader.video import VideoError, center_crop, decode_frames, list_videos
from common.errors import UserError, first_line, run_command
from common.files import atomic_write
from common.hub import load_named, model_identity

FEATURES = "features"
REPORT = "failed.tsv"
SETTINGS = "extract.json"


class EncoderError(UserError, ValueError):
    """The encoder cannot be loaded from what the command line names."""


# ---- encoders ------------------------------------------------------------------------------------
# An encoder has two halves. ``prepare`` runs in the decoding workers: frames in, the video's
# model inputs out (a numpy array, cheap to send between processes); what it needs is loaded by
# ``load_processor`` in the main process before the workers are forked, so they inherit it. ``load``
# and ``encode`` run in the main process: model inputs ``unit(prepared, i)`` of several videos are
# stacked into batches.

class ClipImageFeatures:
    """CLIP image embeddings (vision tower and projection) of frames sampled at ``fps``, one feature
    per frame, through the checkpoint's own image processor: 512-d for ViT-B/32."""
    feature_key = "2d"

    @staticmethod
    def defaults():
        # One frame per second: a guess at the released features' rate (docs/datasets.md). The size
        # comes from the image processor (see load_processor).
        return {"fps": 1.0, "size": None}

    def __init__(self, model, fps, size):
        self.model, self.fps, self.size = model, fps, size
        self.processor = self.network = None

    def settings(self):
        return {"encoder": "clip", "model": model_identity(self.model), "fps": self.fps, "size": self.size}

    def load_processor(self):
        from transformers import AutoImageProcessor
        # The PIL backend: the default one needs torchvision.
        self.processor = load_named("image processor", self.model, lambda **options: AutoImageProcessor.from_pretrained(
            self.model, backend="pil", **options), EncoderError, probe_file="preprocessor_config.json")
        if self.size is None:  # decode at the processor's own resize target, so that it resizes nothing
            size, crop = self.processor.size or {}, self.processor.crop_size or {}
            self.size = size.get("shortest_edge") or min(crop.get("height", 224), crop.get("width", 224))

    def prepare(self, path):
        frames = decode_frames(path, self.fps, self.size)
        return self.processor(images=list(frames), return_tensors="np")["pixel_values"].astype(np.float32)

    @staticmethod
    def units(prepared):
        return len(prepared)

    @staticmethod
    def unit(prepared, i):
        import torch
        return torch.from_numpy(prepared[i])

    def load(self, device):
        import torch
        from transformers import AutoModel
        network = load_named("CLIP model", self.model,
                             lambda **options: AutoModel.from_pretrained(self.model, dtype=torch.float32, **options),
                             EncoderError)
        if not hasattr(network, "get_image_features"):
            raise EncoderError(f"model '{self.model}' is a {type(network).__name__}, which has no image tower "
                               "(a CLIP checkpoint is expected)")
        self.network = network.to(device).eval()

    def encode(self, pixels):
        out = self.network.get_image_features(pixel_values=pixels)
        return out if hasattr(out, "shape") else out.pooler_output  # transformers 5 returns a model output


class S3DClipFeatures:
    """S3D (MIL-NCE, HowTo100M) ``mixed_5c`` features, 1024-d, of clips of ``clip_frames`` frames at
    ``fps``, centre-cropped to ``size`` x ``size``, one clip every ``clip_stride`` frames."""
    feature_key = "s3d"

    def __init__(self, model, fps, size, clip_frames, clip_stride):
        self.model, self.fps, self.size = model, fps, size
        # One clip per second unless given: a guess at the released features' rate.
        self.clip_frames, self.clip_stride = clip_frames, clip_stride or max(1, round(fps))
        self.network = None
        if clip_frames % 2 or size % 2:
            raise EncoderError(f"S3D needs an even --clip-frames and --size, got {clip_frames} and {size}")

    @staticmethod
    def defaults():
        from data_loader.s3d import CLIP_FPS, CLIP_FRAMES
        return {"fps": float(CLIP_FPS), "size": 224, "clip_frames": CLIP_FRAMES, "clip_stride": None}

    def settings(self):
        return {"encoder": "s3d", "model": model_identity(self.model), "fps": self.fps, "size": self.size,
                "clip_frames": self.clip_frames, "clip_stride": self.clip_stride}

    def load_processor(self):
        pass  # decoding and cropping need no model file

    def prepare(self, path):
        frames = center_crop(decode_frames(path, self.fps, self.size), self.size)
        if len(frames) < self.clip_frames:
            raise VideoError(f"too short: {len(frames)} frames at {self.fps:g} fps, one clip needs {self.clip_frames}")
        return frames

    def units(self, prepared):
        return 1 + (len(prepared) - self.clip_frames) // self.clip_stride

    def unit(self, prepared, i):
        import torch
        clip = prepared[i * self.clip_stride:i * self.clip_stride + self.clip_frames]
        return torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2).float() / 255.0

    def load(self, device):
        from data_loader.s3d import S3DWeightsError, load_s3d
        try:
            self.network = load_s3d(self.model).to(device)
        except S3DWeightsError as e:
            raise EncoderError(str(e)) from None

    def encode(self, clips):
        return self.network(clips)


ENCODERS = {"clip": ClipImageFeatures, "s3d": S3DClipFeatures}


# ---- the run -------------------------------------------------------------------------------------

_ENCODER = None  # set before the decoding workers are forked: they inherit it


def _ignore_signals():
    # The main process handles SIGTERM and Ctrl-C, and stops the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prepare(job):
    """(video id, model inputs or None, why it failed or None), in a decoding worker."""
    video_id, path = job
    try:
        return video_id, _ENCODER.prepare(path), None
    except VideoError as e:
        return video_id, None, str(e)
    except Exception as e:  # a damaged file can fail anywhere in a decoder or an image library
        return video_id, None, f"cannot decode ({type(e).__name__}: {first_line(e)})"


def _in_order(pool, jobs, limit):
    """``_prepare`` of each job, in order, with at most ``limit`` videos decoded ahead of the consumer
    (Pool.imap would decode every video ahead while the encoder is slower, holding them all in memory)."""
    in_flight = collections.deque()
    for job in jobs:
        in_flight.append(pool.apply_async(_prepare, (job,)))
        if len(in_flight) >= limit:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


@contextlib.contextmanager
def decoding(encoder, workers):
    """A function that maps ``_prepare`` over jobs in order, in ``workers`` processes (0: in this one).
    The encoder's processor must be loaded: forked workers inherit it."""
    global _ENCODER
    _ENCODER = encoder
    if workers == 0:
        yield lambda jobs: map(_prepare, jobs)
        return
    # Forked before the encoder is loaded (onto a GPU, say): the workers need numpy, PyAV and the processor.
    with multiprocessing.get_context("fork").Pool(workers, initializer=_ignore_signals) as pool:
        yield lambda jobs: _in_order(pool, jobs, 2 * workers)


@contextlib.contextmanager
def sigterm_exits():
    """SIGTERM (a scheduler stopping the job) unwinds like Ctrl-C, so the file being written is removed."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def encode_group(encoder, group, batch_size, device):
    """Features [units, dim] of each video's prepared inputs in ``group``, in batches across videos."""
    import torch
    units = [(v, i) for v, prepared in enumerate(group) for i in range(encoder.units(prepared))]
    rows = [[] for _ in group]
    with torch.inference_mode():
        for start in range(0, len(units), batch_size):
            chunk = units[start:start + batch_size]
            batch = torch.stack([encoder.unit(group[v], i) for v, i in chunk]).to(device)
            out = encoder.encode(batch).float().cpu().numpy()
            for (v, _), row in zip(chunk, out):
                rows[v].append(row)
    return [np.stack(r) for r in rows]


def feature_file(out, video_id):
    return Path(out) / FEATURES / f"{video_id}.npy"


def check_settings(out, settings):
    """Features already in ``out`` must come from the same settings."""
    path = Path(out) / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if changed:
            key = changed[0]
            raise DataFileError(f"{path}: the features in {out} were extracted with {key} = {old.get(key)!r}, "
                                f"this run asks for {settings.get(key)!r}; use another output folder")


def record_settings(out, settings):
    """Written once the encoder has loaded: a run that failed before that leaves the folder free."""
    atomic_write(Path(out) / SETTINGS, lambda f: f.write((json.dumps(settings, indent=2) + "\n").encode()))


def refuse_duplicate_ids(videos, videos_dir):
    """Two files with one id (a.mp4 and a.avi) would write the same features file: a one-line error."""
    first = {}
    for video_id, path in videos:
        if video_id in first:
            raise DataFileError(f"{videos_dir}: {first[video_id]} and {path} have the same video id '{video_id}'; "
                                "rename or move one of them")
        first[video_id] = path


def extract(args):
    encoder_class = ENCODERS[args.encoder]
    options = encoder_class.defaults()
    for key in ("fps", "size", "clip_frames", "clip_stride"):
        value, flag = getattr(args, key), "--" + key.replace("_", "-")
        if value is None:
            continue
        if key not in options:
            raise DataFileError(f"{flag} applies to another encoder, not to --encoder {args.encoder}")
        if value <= 0:
            raise DataFileError(f"{flag} must be positive, got {value}")
        options[key] = value
    encoder = encoder_class(model=args.model, **options)
    videos_dir, out = Path(args.videos), Path(args.out)
    if not videos_dir.is_dir():
        raise DataFileError(f"{videos_dir}: not a folder of videos")
    captions = read_english_captions(args.captions) if args.captions else None
    videos, unreadable = list_videos(videos_dir)
    if unreadable and unreadable[0][0] == str(videos_dir):
        raise DataFileError(f"{videos_dir}: cannot read the folder ({unreadable[0][1]})")
    refuse_duplicate_ids(videos, videos_dir)
    encoder.load_processor()
    check_settings(out, encoder.settings())
    todo = [(vid, path) for vid, path in videos if not feature_file(out, vid).is_file()]
    print(f"{len(videos)} videos in {videos_dir}: {len(videos) - len(todo)} already extracted, {len(todo)} to do")

    failed = [(folder, f"folder cannot be read ({why})") for folder, why in unreadable]
    done = 0
    if todo:
        import torch
        from tqdm import tqdm
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        group, pending = [], 0
        with decoding(encoder, args.workers) as prepare_all, sigterm_exits(), \
                tqdm(total=len(todo), unit="video", desc="extract", disable=None, dynamic_ncols=True) as bar:
            encoder.load(device)
            record_settings(out, encoder.settings())
            for video_id, inputs, error in prepare_all(todo):
                if error is not None:
                    failed.append((video_id, error))
                    bar.update()
                    continue
                group.append((video_id, inputs))
                pending += encoder.units(inputs)
                if pending >= args.batch_size:
                    done += write_group(encoder, group, args.batch_size, device, out, bar)
                    group, pending = [], 0
            done += write_group(encoder, group, args.batch_size, device, out, bar)
    else:
        record_settings(out, encoder.settings())
    report = out / REPORT
    atomic_write(report, lambda f: f.write("".join(f"{v}\t{why}\n" for v, why in failed).encode()))
    if captions is not None:
        write_splits(captions, out, encoder.feature_key, encoder.settings())
    print(f"extracted {done} videos, {len(videos) - len(todo)} were already done, {len(failed)} failed"
          + (f" (listed in {report})" if failed else ""))
    return 1 if failed else 0


def write_group(encoder, group, batch_size, device, out, bar):
    if not group:
        return 0
    features_of = encode_group(encoder, [inputs for _, inputs in group], batch_size, device)
    for (video_id, _), features in zip(group, features_of):
        atomic_write(feature_file(out, video_id), lambda f: np.save(f, features, allow_pickle=False))
        bar.update()
    return len(group)


# ---- captions and splits -------------------------------------------------------------------------

def read_english_captions(path):
    """{split: {video id: [English captions]}} from a JSON file; any other shape is a one-line error."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise DataFileError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFileError(f"{path}: not valid JSON ({first_line(e)})") from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise DataFileError(f"{path}: expected a JSON object {{split: {{video id: [English captions]}}}}")
    for split in data:
        # OUT/<split> must be a new folder right inside OUT, beside none of the run's own files.
        if split in (FEATURES, REPORT, SETTINGS) or split.startswith(".") or "/" in split or "\\" in split \
                or not split.strip():
            raise DataFileError(f"{path}: '{split}' cannot name a split (it names the output folder OUT/<split>: "
                                f"a name not starting with '.', without '/', other than {FEATURES}, {REPORT} "
                                f"and {SETTINGS})")
    return {split: {str(vid): caption_list(caps, path, vid, f"{split}.{vid}") for vid, caps in videos.items()}
            for split, videos in data.items()}


def write_splits(captions, out, feature_key, settings):
    """OUT/<split> in the safe layout: the videos of each split that have features, English captions.
    A split whose ids and captions did not change is kept as it is (with any translations in it)."""
    for split, per_video in captions.items():
        ids = [vid for vid in per_video if feature_file(out, vid).is_file()]
        kept = set(ids)
        missing = [vid for vid in per_video if vid not in kept]
        folder = out / split
        english = [per_video[vid] for vid in ids]
        if not ids:
            print(f"{split}: no video with features; not written")
            continue
        if safe_files(folder, must_exist=False).captions.is_file():
            meta = json.loads(safe_files(folder).captions.read_text(encoding="utf-8"))
            if meta.get("ids") == ids and meta.get("captions", {}).get(ENGLISH) == english:
                print(f"{split}: {folder} is up to date ({len(ids)} videos)")
                continue
            if set(meta.get("captions", {})) - {ENGLISH}:
                print(f"{split}: rewritten with English captions only; run data_loader.translate again "
                      "(its cache makes that cheap)")
        from data_loader.convert import write_safe
        corpus = Corpus(path=str(folder), ids=ids, features=[np.load(feature_file(out, vid)) for vid in ids],
                        captions={ENGLISH: english})
        write_safe(corpus, folder, feature_key, overwrite=True, source={"extracted": settings})
        read_safe_raw(folder)  # read back: a split that fails here is never left looking finished
        print(f"{split}: wrote {folder} ({len(ids)} videos" +
              (f"; {len(missing)} without features left out: {', '.join(missing[:5])}" if missing else "") + ")")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("videos", help="folder of videos (searched recursively); a video's id is its path "
                                       "below the folder without the suffix")
    parser.add_argument("out", help="output folder: features/, failed.tsv, extract.json and one folder per split")
    parser.add_argument("--encoder", choices=sorted(ENCODERS), default="clip")
    parser.add_argument("--model", required=True,
                        help="clip: a CLIP checkpoint (hub id or folder), e.g. openai/clip-vit-base-patch32; "
                             "s3d: the s3d_howto100m.pth file")
    parser.add_argument("--captions", help="JSON {split: {video id: [English captions]}}: write the splits")
    parser.add_argument("--fps", type=float, help="frames decoded per second (clip: 1, s3d: 10)")
    parser.add_argument("--size", type=int, help="shorter side of the decoded frames in pixels (clip: the image "
                                                 "processor's resize size; s3d: 224, then the centre square)")
    parser.add_argument("--clip-frames", type=int, help="s3d: frames per clip (32)")
    parser.add_argument("--clip-stride", type=int, help="s3d: frames between clip starts (default: one clip a second at --fps)")
    parser.add_argument("--batch-size", type=int, default=64, help="frames (clip) or clips (s3d) per forward pass")
    parser.add_argument("--workers", type=int, default=min(4, multiprocessing.cpu_count()),
                        help="decoding processes (0: decode in the main process)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    args = parser.parse_args(argv)
    return run_command(lambda: extract(args))


if __name__ == "__main__":
    sys.exit(main())
