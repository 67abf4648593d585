"""S3D-G video network of MIL-NCE (Miech et al., CVPR 2020), trained on HowTo100M, in plain torch.

Written from the published architecture (Xie et al., ECCV 2018, with the space-to-depth stem of the
TPU version) so that it loads the authors' public PyTorch state dict ``s3d_howto100m.pth`` as
published: the attribute names below are the published key names. The feature is ``mixed_5c``
averaged over time and space, 1024-d, as the released YouCook2 and MSR-VTT S3D features.

Input: ``[batch, 3, frames, height, width]`` RGB in [0, 1]; frames, height and width even. The
authors trained on 32 frames at 10 fps (3.2 s) and used 200 to 256 pixels a side.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_DIM = 1024
CLIP_FRAMES = 32   # frames per clip during MIL-NCE training
CLIP_FPS = 10      # frame rate of those clips

# Keys of the published file that 1024-d features do not use: the 512-d joint text-video heads.
# They are checked (every published key must be there) and then left out.
JOINT_SPACE_KEYS = {
    "fc.weight": (512, FEATURE_DIM), "fc.bias": (512,),
    "text_module.word_embd.weight": (66250, 300),
    "text_module.fc1.weight": (2048, 300), "text_module.fc1.bias": (2048,),
    "text_module.fc2.weight": (512, 2048), "text_module.fc2.bias": (512,),
}


class S3DWeightsError(ValueError):
    """A weights file does not have the published S3D layout."""


class Unit3d(nn.Module):
    """Conv3d without bias, BatchNorm, ReLU. ``separable`` splits a t x k x k kernel into a 1 x k x k
    spatial convolution and a t x 1 x 1 temporal one, each with its own BatchNorm (the 'S' of S3D)."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, separable=False):
        super().__init__()
        self.separable = separable
        if separable:
            t, k = kernel[0], kernel[1]
            self.conv1 = nn.Conv3d(cin, cout, (1, k, k), stride=(1, stride, stride), padding=(0, padding, padding),
                                   bias=False)
            self.bn1 = nn.BatchNorm3d(cout)
            self.conv2 = nn.Conv3d(cout, cout, (t, 1, 1), stride=(stride, 1, 1), padding=(padding, 0, 0), bias=False)
            self.bn2 = nn.BatchNorm3d(cout)
        else:
            self.conv1 = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
            self.bn1 = nn.BatchNorm3d(cout)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if self.separable:
            x = F.relu(self.bn2(self.conv2(x)))
        return x


class SelfGating(nn.Module):
    """The 'G' of S3D-G: channels scaled by a sigmoid of a linear map of their space-time average."""

    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, x):
        weights = torch.sigmoid(self.fc(x.mean(dim=(2, 3, 4))))
        return x * weights[:, :, None, None, None]


class MaxPoolSame(nn.Module):
    """Max pooling with TensorFlow's 'SAME' padding, in which the published weights were trained. The
    pad is zeros: the inputs follow a ReLU, so a zero never wins over a real value."""

    def __init__(self, kernel, stride):
        super().__init__()
        pads = []
        for k, s in reversed(list(zip(kernel, stride))):  # F.pad lists the last dimension first
            total = max(k - s, 0)
            pads += [total // 2, total - total // 2]
        self.pads = tuple(pads)
        self.pool = nn.MaxPool3d(kernel, stride, ceil_mode=True)

    def forward(self, x):
        return self.pool(F.pad(x, self.pads))


class Inception(nn.Module):
    """Four branches: 1x1x1; 1x1x1 then separable 3x3x3 (twice); 3x3x3 max pool then 1x1x1; each gated."""

    def __init__(self, cin, b0, b1a, b1b, b2a, b2b, b3):
        super().__init__()
        self.conv_b0 = Unit3d(cin, b0, (1, 1, 1))
        self.conv_b1_a = Unit3d(cin, b1a, (1, 1, 1))
        self.conv_b1_b = Unit3d(b1a, b1b, (3, 3, 3), padding=1, separable=True)
        self.conv_b2_a = Unit3d(cin, b2a, (1, 1, 1))
        self.conv_b2_b = Unit3d(b2a, b2b, (3, 3, 3), padding=1, separable=True)
        self.maxpool_b3 = nn.MaxPool3d(3, stride=1, padding=1)
        self.conv_b3_b = Unit3d(cin, b3, (1, 1, 1))
        self.gating_b0, self.gating_b1, self.gating_b2, self.gating_b3 = (SelfGating(c) for c in (b0, b1b, b2b, b3))
        self.out_channels = b0 + b1b + b2b + b3

    def forward(self, x):
        return torch.cat([
            self.gating_b0(self.conv_b0(x)),
            self.gating_b1(self.conv_b1_b(self.conv_b1_a(x))),
            self.gating_b2(self.conv_b2_b(self.conv_b2_a(x))),
            self.gating_b3(self.conv_b3_b(self.maxpool_b3(x))),
        ], dim=1)


# Output channels of each Inception block (branch 0, 1a, 1b, 2a, 2b, 3), as published.
INCEPTION = {
    "mixed_3b": (64, 96, 128, 16, 32, 32),
    "mixed_3c": (128, 128, 192, 32, 96, 64),
    "mixed_4b": (192, 96, 208, 16, 48, 64),
    "mixed_4c": (160, 112, 224, 24, 64, 64),
    "mixed_4d": (128, 128, 256, 24, 64, 64),
    "mixed_4e": (112, 144, 288, 32, 64, 64),
    "mixed_4f": (256, 160, 320, 32, 128, 128),
    "mixed_5b": (256, 160, 320, 32, 128, 128),
    "mixed_5c": (384, 192, 384, 48, 128, 128),
}


class S3D(nn.Module):
    """The S3D-G video tower up to ``mixed_5c``; ``forward`` returns its space-time average [batch, 1024]."""

    def __init__(self):
        super().__init__()
        # The stem sees 2x2x2 space-to-depth blocks: 8 x 3 channels at half the resolution.
        self.conv1 = Unit3d(24, 64, (2, 4, 4), padding=(1, 2, 2))
        self.conv_2b = Unit3d(64, 64, (1, 1, 1))
        self.conv_2c = Unit3d(64, 192, (3, 3, 3), padding=1, separable=True)
        self.gating = SelfGating(192)
        self.maxpool_2a = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.maxpool_3a = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.maxpool_4a = MaxPoolSame((3, 3, 3), (2, 2, 2))
        self.maxpool_5a = MaxPoolSame((2, 2, 2), (2, 2, 2))
        channels = 192
        for name, outs in INCEPTION.items():
            block = Inception(channels, *outs)
            setattr(self, name, block)
            channels = block.out_channels
        assert channels == FEATURE_DIM

    @staticmethod
    def space_to_depth(x):
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // 2, 2, h // 2, 2, w // 2, 2)
        return x.permute(0, 3, 5, 7, 1, 2, 4, 6).reshape(b, 8 * c, t // 2, h // 2, w // 2)

    def forward(self, video):
        x = self.conv1(self.space_to_depth(video))
        x = x[:, :, 1:, 1:, 1:]  # with the stem's padding, this reproduces TensorFlow's 'SAME' output
        x = self.maxpool_2a(x)
        x = self.gating(self.conv_2c(self.conv_2b(x)))
        x = self.maxpool_3a(x)
        x = self.mixed_3c(self.mixed_3b(x))
        x = self.maxpool_4a(x)
        for name in ("mixed_4b", "mixed_4c", "mixed_4d", "mixed_4e", "mixed_4f"):
            x = getattr(self, name)(x)
        x = self.maxpool_5a(x)
        x = self.mixed_5c(self.mixed_5b(x))
        return x.mean(dim=(2, 3, 4))


def load_s3d(path):
    """An S3D in eval mode with the weights of the published ``s3d_howto100m.pth`` at ``path``. Every
    published key must be present with its published shape; anything else is a one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise S3DWeightsError(f"{path}: no such S3D weights file (s3d_howto100m.pth, see README)") from None
    except Exception as e:  # torch raises several types for a file that is not a state dict
        raise S3DWeightsError(f"{path}: not a PyTorch state dict ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise S3DWeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    model = S3D()
    # BatchNorm's step counters do not change the output; a file saved without them loads the same.
    counters = {k for k in model.state_dict() if k.endswith("num_batches_tracked")}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in counters}
    expected.update(JOINT_SPACE_KEYS)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in counters]
    if missing or unexpected:
        what = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        raise S3DWeightsError(f"{path}: not the published S3D HowTo100M layout: {what} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, shape in expected.items():
        if not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != shape:
            raise S3DWeightsError(f"{path}: '{key}' has shape {tuple(getattr(state[key], 'shape', ()))}, "
                                  f"published {shape}")
    model.load_state_dict({k: v for k, v in state.items() if k not in JOINT_SPACE_KEYS}, strict=False)
    return model.eval()
