"""Model FLOPs counted from the parameters, and the peak FLOP/s of known GPUs (sections 2 and 4)."""
import torch.nn as nn

# Peak dense bf16 tensor FLOP/s by device name (no sparsity).
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def param_count(modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def text_forward_flops(encoder, sequences, seq_len):
    """Forward FLOPs of a TextEncoder: 2 per parameter per token it touches. Embedding tables are
    lookups (no FLOPs); the pooler (if the backbone has one), the LayerNorm and the projection
    act once per sequence; the attention score products (a few % at 35 tokens) are left out."""
    backbone = encoder.backbone
    embedding = [m for m in backbone.modules() if isinstance(m, nn.Embedding)]
    pooler = [backbone.pooler] if getattr(backbone, "pooler", None) is not None else []
    per_token = param_count([backbone]) - param_count(embedding) - param_count(pooler)
    per_sequence = param_count(pooler) + param_count([encoder.norm, encoder.proj])
    return 2.0 * (per_token * sequences * seq_len + per_sequence * sequences)


def video_forward_flops(video, videos, n_tokens):
    """Forward FLOPs of a VideoEncoder: the input projection and norm on every frame token, the
    transformer blocks on the frames plus CLS, the output projection on CLS only."""
    per_frame = param_count([video.token_proj, video.norm])
    per_block_token = param_count(video.blocks)
    return 2.0 * videos * (per_frame * n_tokens + per_block_token * (n_tokens + 1) + param_count([video.proj]))


def c2kd_step_flops(student, teachers, batch_size, languages, seq_len, n_video_tokens, online,
                    teacher_seq_lens=None, student_buckets=None):
    """Model FLOPs of one C2KD step: forward and backward (3x forward) of the student's text encoder
    over every language and of its video encoder, plus, with online teachers, one forward of each
    teacher's text (English) and video encoders. ``seq_len`` and ``teacher_seq_lens`` (default:
    ``seq_len`` for every teacher) are the text columns each encoder runs; ``student_buckets``
    [(rows, columns)] replaces the student's one batch of ``seq_len`` columns by length buckets."""
    teacher_seq_lens = teacher_seq_lens or [seq_len] * len(teachers)
    student_buckets = student_buckets or [(batch_size * languages, seq_len)]
    student_fwd = (sum(text_forward_flops(student.text, rows, columns) for rows, columns in student_buckets)
                   + video_forward_flops(student.video, batch_size, n_video_tokens))
    teacher_fwd = sum(text_forward_flops(t.text, batch_size, length)
                      + video_forward_flops(t.video, batch_size, n_video_tokens)
                      for t, length in zip(teachers, teacher_seq_lens)) if online else 0.0
    return {"student": 3.0 * student_fwd, "teachers": teacher_fwd, "total": 3.0 * student_fwd + teacher_fwd}


def peak_bf16_flops(device_name):
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None

