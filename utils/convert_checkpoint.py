"""Convert the authors' released C2KD checkpoints into checkpoints of this project.

    python -m utils.convert_checkpoint weights/c2kd_teachers/msrvtt/xlm/latest_model.pth \\
        weights/converted/msrvtt_xlm.pt --text-encoder xlm-roberta-base --data-config configs/msrvtt/clip/base.json

A released file (docs/reference.md §5) is a torch.save'd dict with ``state_dict`` in the reference's
module names (docs/reference.md §2.6) and ``config``, a pickled ``parse_config.ConfigParser`` of the reference code.
It is read without running anything from it: the unpickler resolves only what tensors and plain
containers need and puts inert placeholders where the reference's config object (and the paths
and argparse namespace it holds) would be. Every weight the reference model uses is renamed onto
``model.model.RetrievalModel``, the dead ones (docs/reference.md §2.6) are dropped by name, anything else is an
error. The data and evaluation settings (among them which English the teachers read,
``data.clean_english``) come from the dataset config it is given. The result is loaded by test.py
and by ``teachers.checkpoints`` like any other checkpoint.
"""
import argparse
import pickle
import re
import sys
import types
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path

import torch

from config_keys import LABSE
from data_loader.readers import READER_OPTIONS, TEACHER_ENGLISH_FIELD
from data_loader.dataset import EnglishReading
from model.model import build_model
from parse_config import load_flat, resolve
from common.checkpoint import FORMAT, save_checkpoint
from common.errors import UserError, first_line, run_command

# The reference's fusion transformer always has 4 heads (docs/reference.md §2.1); weights cannot tell.
REFERENCE_HEADS = 4
STUDENT_ARCH = "LaBSE"  # the student class is BaselineTokenFusionPerModModelLaBSE (docs/reference.md §2.1)


class ConvertError(UserError, ValueError):
    """A reference checkpoint cannot be read or does not fit this project's model."""


# ---- reading without running code ---------------------------------------------------------------

class InertObject:
    """Stands in for an object of the reference's pickled config: keeps its data, runs nothing."""
    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<inert {self.qualname}>"


# The reference's ConfigParser holds its YAML config, argparse.Namespace args and pathlib paths.
_INERT = {("parse_config", "ConfigParser"), ("argparse", "Namespace"),
          ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}
_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}


class RefusedGlobal(pickle.UnpicklingError):
    pass


class ReferenceCheckpointUnpickler(pickle.Unpickler):
    """Tensors and plain containers; the reference's config objects become inert placeholders;
    every other global is refused (data files have their own, stricter unpickler: safe_pickle)."""
    _placeholders = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if (module, name) in _INERT:
            key = f"{module}.{name}"
            if key not in self._placeholders:
                self._placeholders[key] = type(name, (InertObject,), {"qualname": key})
            return self._placeholders[key]
        raise RefusedGlobal(f"refused global {module}.{name}")


def _restricted_load(file, **kwargs):
    return ReferenceCheckpointUnpickler(file, **kwargs).load()


# What torch.load needs of a pickle module (the zip format uses Unpickler, the legacy one load).
restricted_pickle = types.SimpleNamespace(__name__="restricted_pickle", Unpickler=ReferenceCheckpointUnpickler,
                                          load=_restricted_load)


def read_reference(path):
    """(state dict without ``module.`` prefixes, the other top-level entries) of a reference file."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: file not found")
    try:
        # Memory-mapped where possible: a released file is mostly optimizer state and unused modules.
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle,
                         mmap=zipfile.is_zipfile(path))
    except RefusedGlobal as e:
        raise ConvertError(f"{path}: {e}; a reference checkpoint holds only tensors, plain containers "
                           "and its config, so nothing from this file was run") from None
    except Exception as e:  # truncated or foreign files raise many types
        raise ConvertError(f"{path}: not a readable torch checkpoint ({first_line(e)})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        raise ConvertError(f"{path}: already a checkpoint of this project; no conversion needed")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, meta = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, meta = obj, {}
    else:
        raise ConvertError(f"{path}: expected a reference checkpoint (a dict with 'state_dict') "
                           "or a bare state dict of tensors")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConvertError(f"{path}: state_dict entry '{key}' is a {type(value).__name__}, not a tensor")
    return {k.removeprefix("module."): v for k, v in state.items()}, meta


# ---- names ----------------------------------------------------------------------------------------

# Reference key (full match) -> key of RetrievalModel.
RENAMES = [
    (r"fusion_text\.(.+)", r"text.backbone.\1"),
    (r"text_proj\.0\.(weight|bias)", r"text.norm.\1"),
    (r"text_proj\.1\.fc\.(weight|bias)", r"text.proj.fc.\1"),
    (r"text_proj\.1\.cg\.fc\.(weight|bias)", r"text.proj.gate.\1"),
    (r"video_token_proj\.fc\.(weight|bias)", r"video.token_proj.fc.\1"),
    (r"video_token_proj\.cg\.fc\.(weight|bias)", r"video.token_proj.gate.\1"),
    (r"video_norm_layer\.(weight|bias)", r"video.norm.\1"),
    (r"fusion_video\.(masking_token|cls_token)", r"video.\1"),
    (r"fusion_video\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj)\.(weight|bias)", r"video.blocks.\1.\2.\3"),
    (r"fusion_video\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"video.blocks.\1.mlp.0.\2"),
    (r"fusion_video\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"video.blocks.\1.mlp.2.\2"),
    (r"video_proj\.fc\.(weight|bias)", r"video.proj.fc.\1"),
    (r"video_proj\.cg\.fc\.(weight|bias)", r"video.proj.gate.\1"),
]

# Parts of the reference model that its forward pass never uses (docs/reference.md §2.6), by key prefix.
DEAD = {
    "davenet.": "audio network, built but never run",
    "audio_token_proj.": "audio input projection, unused",
    "audio_proj.": "audio output projection, unused",
    "audio_norm_layer.": "audio norm, unused",
    "text_token_proj.": "word2vec projection, output discarded",
    "text_norm_layer.": "word2vec-path norm, unused",
    "text_proj_t2t.": "text-to-text head, unused",
    "fusion.": "alias of fusion_video (duplicate keys)",
    "fusion_video.norm.": "final norm of the fusion transformer, never applied",
    "learnable_weights": "teacher-pooling weights of the learnable_* options, not part of the model",
}

# Text-encoder entries that older transformers versions saved and this project's encoder may lack.
BACKBONE_EXTRAS = {
    r"embeddings\.(position_ids|token_type_ids)": "index buffer that this transformers version does not save",
    r"pooler\..+": "pooler, which this project's text encoder does not have (its output was unused)",
}


def dead_reason(key):
    return next((f"{prefix}*: {why}" for prefix, why in DEAD.items() if key.startswith(prefix)), None)


def target_key(key):
    for pattern, replacement in RENAMES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def backbone_extra_reason(key):
    inner = key.removeprefix("fusion_text.")
    return next((f"{key}: {why}" for pattern, why in BACKBONE_EXTRAS.items() if re.fullmatch(pattern, inner)), None)


# ---- conversion ----------------------------------------------------------------------------------

def infer_architecture(state, path):
    """The model section and the frame-feature size that the reference weights describe."""
    for key in ("fusion_video.cls_token", "video_proj.fc.weight", "video_token_proj.fc.weight",
                "fusion_video.blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ConvertError(f"{path}: no '{key}' in the state dict; not a reference C2KD checkpoint")
    width = state["fusion_video.cls_token"].shape[-1]
    blocks = {m.group(1) for k in state if (m := re.match(r"fusion_video\.blocks\.(\d+)\.", k))}
    model = {"width": width, "projection_dim": state["video_proj.fc.weight"].shape[0], "depth": len(blocks),
             "heads": REFERENCE_HEADS, "mlp_ratio": state["fusion_video.blocks.0.mlp.fc1.weight"].shape[0] / width}
    return model, state["video_token_proj.fc.weight"].shape[1]


def expected_state(model_cfg, feature_dim):
    """Names, shapes and dtypes of this project's model, built on the meta device (no memory, no download
    of weights; the text encoder's configuration is read from --text-encoder)."""
    with torch.device("meta"):
        model = build_model(model_cfg, feature_dim, pretrained_text=False)
    return model.state_dict()


def map_state(state, expected, path, allow_unknown=False):
    """(state dict of RetrievalModel, Counter of dropped reasons, unknown keys)."""
    converted, dropped, unknown = {}, Counter(), []
    for key, tensor in state.items():
        reason = dead_reason(key)
        target = None if reason else target_key(key)
        if target is not None and target not in expected and key.startswith("fusion_text."):
            reason = backbone_extra_reason(key)
        if reason:
            dropped[reason] += 1
            continue
        if target is None:
            unknown.append(key)
            continue
        if target not in expected:
            raise ConvertError(f"{path}: '{key}' maps to '{target}', which the model built from "
                               "--text-encoder lacks (is --text-encoder the encoder this checkpoint was trained with?)")
        want = expected[target]
        if tensor.shape != want.shape:
            raise ConvertError(f"{path}: '{key}' has shape {list(tensor.shape)}, but '{target}' of this "
                               f"project's model has {list(want.shape)} (check --text-encoder)")
        converted[target] = tensor.detach().to(want.dtype).clone()  # own, compact storage
    if unknown and not allow_unknown:
        raise ConvertError(f"{path}: {len(unknown)} unknown key(s), first '{unknown[0]}': neither a weight of "
                           "the reference model nor a known unused part (--allow-unknown drops them)")
    missing = [k for k in expected if k not in converted]
    if missing:
        raise ConvertError(f"{path}: no weight for '{missing[0]}' of this project's model ({len(missing)} "
                           "missing; is --text-encoder the encoder this checkpoint was trained with?)")
    return converted, dropped, unknown


def _count(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def dataset_recipe(data_config, dim, src):
    """The keys of the dataset config ``data_config`` that describe the data and its evaluation
    (``data.*``, ``eval.*``, ``languages``), as its file and the ones it extends set them. It must say
    how the dataset's teachers read English (``data.clean_english``): the converter never assumes it."""
    recipe = {k: v for k, v in load_flat(data_config).items() if k == "languages" or k.startswith(("data.", "eval."))}
    if "data.clean_english" not in recipe:
        raise ConvertError(f"{data_config}: sets no 'data.clean_english' (whether the dataset's teachers read "
                           "regex-cleaned English); pass the dataset's config, e.g. configs/msrvtt/clip/base.json")
    if recipe.get("data.feature_dim", dim) != dim:
        raise ConvertError(f"{src}: 'video_token_proj.fc.weight' takes {dim}-d frame features, but "
                           f"{data_config} sets data.feature_dim {recipe['data.feature_dim']}")
    return recipe


def convert(src, dst, text_encoder, data_config, feature_key=None, feature_dim=None, allow_unknown=False,
            student_mask_pooling=None, pool_mask_tokenizer=LABSE):
    """Write ``dst`` from the reference checkpoint ``src``; returns a summary dict.

    ``data_config``: the config of the dataset the checkpoint was trained on, whose data and
    evaluation settings the converted checkpoint takes (see ``dataset_recipe``).
    ``student_mask_pooling`` None: true for teachers (every reference arch but the LaBSE student),
    whose text was mean-pooled with the student tokenizer's attention mask (docs/reference.md §2.3); in evaluation
    and inference that mask comes from ``pool_mask_tokenizer``, in C2KD from the student's tokenizer."""
    state, meta = read_reference(src)
    model_cfg, dim = infer_architecture(state, src)
    if feature_dim is not None and feature_dim != dim:
        raise ConvertError(f"{src}: 'video_token_proj.fc.weight' takes {dim}-d frame features, "
                           f"but --feature-dim is {feature_dim}")
    recipe = dataset_recipe(data_config, dim, src)
    arch = meta.get("arch") if isinstance(meta.get("arch"), str) else None
    teacher = not (arch or "").endswith(STUDENT_ARCH)
    if student_mask_pooling is None:
        student_mask_pooling = teacher
    # docs/reference.md §1.1: S3D features are 1024-d, CLIP ones 512-d (YouCook2-CLIP's configs say 2d_raw)
    if feature_key is None:
        feature_key = recipe.get("data.feature_key", "s3d" if dim == 1024 else "2d")
    # The reference's teachers read English as their dataset's recipe says (data.clean_english), its
    # student the raw caption.
    model_cfg = {"text_encoder": str(text_encoder), **model_cfg, "role": "teacher" if teacher else "student",
                 "pool_with_student_mask": student_mask_pooling, "pool_mask_tokenizer": str(pool_mask_tokenizer)}
    flat = {**recipe, **{f"model.{k}": v for k, v in model_cfg.items()}}
    flat.update({"name": Path(dst).stem, "stage": "translate-train", "data.feature_key": feature_key,
                 "data.feature_dim": dim})
    config = resolve(flat)
    weights, dropped, unknown = map_state(state, expected_state(config["model"], dim), src, allow_unknown)
    save_checkpoint({"model": weights, "config": config, "epoch": _count(meta.get("epoch")),
                     "step": _count(meta.get("step")), "converted_from": str(src), "reference_arch": arch}, dst)
    return {"arch": arch, "tensors": len(weights), "dropped": dropped, "unknown": unknown, "config": config}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m utils.convert_checkpoint",
        description="Convert a released C2KD checkpoint (latest_model.pth) into a checkpoint of this project.")
    parser.add_argument("src", metavar="IN", help="reference checkpoint (.pth), or a bare state dict")
    parser.add_argument("dst", metavar="OUT", help="converted checkpoint to write; its stem becomes the run name")
    parser.add_argument("--text-encoder", required=True,
                        help="hub id or local folder of the text encoder the checkpoint was trained with")
    parser.add_argument("--data-config", required=True,
                        help="config of the dataset the checkpoint was trained on (e.g. configs/rudder/clip/base.json): "
                             "the converted checkpoint takes its data and evaluation settings, among them which "
                             "English its teachers read (data.clean_english)")
    parser.add_argument("--feature-key", help="video feature key of the data (default: the data config's, else s3d "
                                              "for 1024-d and 2d otherwise)")
    parser.add_argument("--feature-dim", type=int, help="expected frame-feature size (checked; inferred anyway)")
    parser.add_argument("--allow-unknown", action="store_true", help="drop keys that are neither mapped nor known dead")
    pooling = parser.add_mutually_exclusive_group()
    pooling.add_argument("--student-mask-pooling", dest="student_mask", action="store_true", default=None,
                         help="pool text with the student's attention mask, as the reference teachers did "
                              "(default for every checkpoint but the LaBSE student)")
    pooling.add_argument("--own-mask-pooling", dest="student_mask", action="store_false",
                         help="pool text with the encoder's own attention mask")
    parser.add_argument("--pool-mask-tokenizer", default=LABSE,
                        help="with student-mask pooling: the student tokenizer (hub id or folder) whose mask "
                             f"test.py and demo.py pool with (default: {LABSE})")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    return run_command(lambda: convert_and_describe(args), args.debug)


def english_field(cfg):
    """For a layout whose items keep two English fields (data.student_english): the one this
    checkpoint reads, as " of each item's 'FIELD'"; else ""."""
    data = cfg["data"]
    if "student_english" not in READER_OPTIONS[data["layout"]]:
        return ""
    own = cfg["model"]["role"] == "student" and data["student_english"] != "shared"
    return f" of each item's '{data['student_english'] if own else TEACHER_ENGLISH_FIELD}'"


def convert_and_describe(args):
    summary = convert(args.src, args.dst, args.text_encoder, args.data_config, args.feature_key, args.feature_dim,
                      args.allow_unknown, args.student_mask, args.pool_mask_tokenizer)
    cfg = summary["config"]
    print(f"{args.src}: {summary['arch'] or 'bare state dict'} -> {summary['tensors']} tensors")
    for reason, n in sorted(summary["dropped"].items()):
        print(f"  dropped {n:4d} x {reason}")
    for key in summary["unknown"]:
        print(f"  dropped unknown key: {key}")
    m = cfg["model"]
    print(f"  model: width {m['width']}, depth {m['depth']}, heads {m['heads']}, mlp_ratio {m['mlp_ratio']}, "
          f"projection_dim {m['projection_dim']}, pool_with_student_mask {m['pool_with_student_mask']}; "
          f"data: {cfg['data']['feature_key']} {cfg['data']['feature_dim']}-d")
    print(f"  English: {m['role']} reading {EnglishReading.of(cfg).describe()}{english_field(cfg)} "
          f"(data.clean_english {str(cfg['data']['clean_english']).lower()}, from {args.data_config})")
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    sys.exit(main())
