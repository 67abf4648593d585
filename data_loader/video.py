"""Decoding videos into RGB frames sampled at a fixed rate, with PyAV (FFmpeg's libraries).

PyAV reads every container and codec FFmpeg reads, without a separate ffmpeg program or a
subprocess per video, returns numpy arrays, and installs as a wheel that bundles FFmpeg.
"""
from pathlib import Path

import numpy as np

# File names taken as videos when a folder is listed.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp")


class VideoError(Exception):
    """A video that cannot be used: undecodable, without frames, or too short."""


def list_videos(folder):
    """(video id, path) of the videos under ``folder``, sorted; the id is the path below ``folder``
    without its suffix. Folders that cannot be read come back as (folder, reason) in a second list."""
    folder = Path(folder)
    found, unreadable, seen = [], [], set()

    def walk(directory):
        if directory.resolve() in seen:  # a link back up the tree
            return
        seen.add(directory.resolve())
        try:
            entries = sorted(directory.iterdir())
        except OSError as e:
            unreadable.append((str(directory), e.strerror or type(e).__name__))
            return
        for entry in entries:
            if entry.is_dir():
                walk(entry)
            elif entry.suffix.lower() in VIDEO_SUFFIXES:
                found.append((entry.relative_to(folder).with_suffix("").as_posix(), entry))

    walk(folder)
    return found, unreadable


def shorter_side_size(width, height, size):
    """(width, height) scaled so that the shorter side is ``size`` (even numbers, for the codecs)."""
    scale = size / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def decode_frames(path, fps, size=None):
    """The frames of ``path`` at ``fps`` frames per second, as uint8 RGB [frames, height, width, 3].

    Frame k is the first decoded frame shown at or after k / fps seconds (a source slower than
    ``fps`` repeats frames, so the time scale stays that of ``fps``). ``size``: the shorter side is
    scaled to it (bilinear, by FFmpeg's swscale), else frames keep their size.
    """
    import av
    step, frames = 1.0 / fps, []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            next_time, start = 0.0, None
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                start = frame.time if start is None else start
                t = frame.time - start
                if t + 1e-6 < next_time:
                    continue
                if size:
                    w, h = shorter_side_size(frame.width, frame.height, size)
                    rgb = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BILINEAR")
                else:
                    rgb = frame.to_ndarray(format="rgb24")
                while next_time <= t + 1e-6:
                    frames.append(rgb)
                    next_time += step
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot decode ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})")
    if not frames:
        raise VideoError("no decodable frame")
    return np.stack(frames)


def center_crop(frames, size):
    """The central ``size`` x ``size`` square of frames [frames, height, width, channels]."""
    h, w = frames.shape[1:3]
    if h < size or w < size:
        raise VideoError(f"frames of {w}x{h} are smaller than the {size}x{size} crop")
    top, left = (h - size) // 2, (w - size) // 2
    return frames[:, top:top + size, left:left + size]


def write_video(path, frames, fps, codec="mpeg4"):
    """Write uint8 RGB frames [frames, height, width, 3] (even height and width) as a video file:
    synthetic videos for the tests and the benchmark."""
    import av
    frames = np.asarray(frames, dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    return Path(path)


def synthetic_frames(n, height, width, seed=0):
    """``n`` frames of a moving colour gradient (smooth, so that a codec keeps them close)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, 3)
    return np.stack([np.stack([(base[c] + 4 * (x + y) + 9 * t * (c + 1)) % 256 for c in range(3)], axis=-1)
                     for t in range(n)]).astype(np.uint8)
