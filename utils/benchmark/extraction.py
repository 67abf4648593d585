"""Section 5, feature extraction: videos per second decoded, and encoded by CLIP and S3D."""
import tempfile
import time
from pathlib import Path

import torch

from utils.benchmark.timing import timed


def bench_extraction(devices, n_videos=4, seconds=4.0, source=(240, 320), source_fps=25, batch_size=32, quick=False):
    """Videos per second of ``data_loader.extract``'s two halves on synthetic videos (``seconds`` long,
    ``source`` height x width at ``source_fps``): decoding and preparing the model inputs in one
    process (a decoding worker), and encoding them on each of ``devices``. Both encoders have the
    published sizes with random weights: CLIP ViT-B/32 (its image processor: 224 x 224) at 1 frame a
    second, and S3D on 32-frame clips at 10 fps, one a second (``quick``: 16-frame clips of 112 x 112)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from data_loader.extract import ClipImageFeatures, S3DClipFeatures, encode_group
    from data_loader.s3d import S3D
    from data_loader.video import synthetic_frames, write_video

    # ViT-B/32's processor (shorter side 224, centre crop 224) and the size load_processor takes from it.
    clip = ClipImageFeatures(model="random CLIP ViT-B/32", **{**ClipImageFeatures.defaults(), "size": 224})
    clip.processor = CLIPImageProcessorPil()
    s3d = S3DClipFeatures(model="random S3D", **{**S3DClipFeatures.defaults(),
                                                   **({"size": 112, "clip_frames": 16} if quick else {})})
    torch.manual_seed(0)
    networks = {"clip": lambda: CLIPModel(CLIPConfig(text_config={"num_hidden_layers": 1})).eval(),
                "s3d": lambda: S3D().eval()}
    out = {"videos": n_videos, "seconds": seconds, "source": f"{source[1]}x{source[0]} at {source_fps} fps",
           "batch_size": batch_size, "encoders": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_video(Path(tmp) / f"v{i}.mp4", synthetic_frames(int(seconds * source_fps), *source, seed=i),
                             source_fps) for i in range(n_videos)]
        for name, encoder in (("clip", clip), ("s3d", s3d)):
            started = time.perf_counter()
            prepared = [encoder.prepare(p) for p in paths]
            row = {"settings": encoder.settings(), "units_per_video": sum(map(encoder.units, prepared)) / n_videos,
                   "decode_videos_per_s": n_videos / (time.perf_counter() - started), "encode_videos_per_s": {}}
            network = networks[name]()
            for device in devices:
                encoder.network = network.to(device)
                encode_group(encoder, prepared[:1], batch_size, device)  # warm-up
                encode_s, _ = timed(lambda: encode_group(encoder, prepared, batch_size, device), device)
                row["encode_videos_per_s"][str(device)] = n_videos / encode_s
            out["encoders"][name] = row
            del network, encoder.network
    return out

