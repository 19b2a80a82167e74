"""face-vid2vid's networks in PyTorch, with the parameter names of the public reimplementation whose checkpoint MMFA
starts from (zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis, modules/*.py).

The reference for mimajax.mmfa's JAX modules and for the released checkpoint's format: `state_dict()` of these
modules has that file's keys and shapes (Logger.save_cpk writes {'generator', 'discriminator', 'kp_detector',
'he_estimator': state_dict, 'optimizer_*': ..., 'epoch'} to NNNNNNNN-checkpoint.pth.tar). Written from reading the
repository (no code copied); what differs from it, and why:
  - SynchronizedBatchNorm2d/3d is nn.BatchNorm2d/3d: same keys (weight, bias, running_mean, running_var,
    num_batches_tracked), same arithmetic on one device.
  - HEEstimator's widths (256, 512, 1024, 2048) and bottleneck counts (3, 3, 5, 2) are hard-coded there; here they
    follow block_expansion / max_features (64 / 2048 give exactly those widths) and `num_bottlenecks`, so tiny test
    versions keep every name.
  - SPADEDecoder's widths (ic 256, oc 64, SPADE hidden 128) are hard-coded there; here ic is the generator's `fourth`
    width and oc its block_expansion (vox-256: 256 / 64, the same), the hidden width an argument.
  - The spectral norm is torch.nn.utils.spectral_norm, as there: keys weight_orig / weight_u / weight_v, one power
    iteration per training forward, the stored u, v as they are in eval mode.
The released Vox-256-New checkpoint is the SPADE generator (demo.py's default `--gen spade`: `first` is 3x3); the
Beta one is OcclusionAwareGenerator (`first` 7x7, decoder resblocks_2d / up_blocks / final). Both are here
(`make_generator(..., kind=)`), for their key sets; MMFA keeps neither decoder.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BatchNorm2d, BatchNorm3d = nn.BatchNorm2d, nn.BatchNorm3d


# ----------------------------------------------------------------------------------------------------------
# Coordinates and the Gaussian heatmaps of keypoints (modules/util.py)


def coordinate_grid_3d(d: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
  """(d, h, w, 3) grid of (x, y, z), each 2 i / (n - 1) - 1 over its axis (grid_sample's order: x is width)."""
  z, y, x = (2 * (torch.arange(n, dtype=like.dtype, device=like.device) / (n - 1)) - 1 for n in (d, h, w))
  zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
  return torch.stack([xx, yy, zz], dim=-1)


def keypoint_gaussians(kp: torch.Tensor, spatial: Sequence[int], variance: float) -> torch.Tensor:
  """(N, K, 3) keypoints -> (N, K, d, h, w) unnormalised Gaussians exp(-|p - kp|^2 / (2 variance))."""
  grid = coordinate_grid_3d(*spatial, like=kp)
  diff = grid[None, None] - kp[:, :, None, None, None, :]
  return torch.exp(-0.5 * (diff**2).sum(-1) / variance)


# ----------------------------------------------------------------------------------------------------------
# Blocks (modules/util.py)


class ResBottleneck(nn.Module):
  """1x1 -> 3x3 (stride) -> 1x1, BatchNorm after each conv, projection skip when strided; ReLU after the sum."""

  def __init__(self, in_features: int, stride: int):
    super().__init__()
    mid = in_features // 4
    self.conv1 = nn.Conv2d(in_features, mid, kernel_size=1)
    self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, padding=1, stride=stride)
    self.conv3 = nn.Conv2d(mid, in_features, kernel_size=1)
    self.norm1, self.norm2, self.norm3 = BatchNorm2d(mid), BatchNorm2d(mid), BatchNorm2d(in_features)
    self.stride = stride
    if stride != 1:
      self.skip = nn.Conv2d(in_features, in_features, kernel_size=1, stride=stride)
      self.norm4 = BatchNorm2d(in_features)

  def forward(self, x):
    out = F.relu(self.norm1(self.conv1(x)))
    out = F.relu(self.norm2(self.conv2(out)))
    out = self.norm3(self.conv3(out))
    if self.stride != 1:
      x = self.norm4(self.skip(x))
    return F.relu(out + x)


class ResBlock2d(nn.Module):
  """Pre-activation residual block: x + conv2(relu(norm2(conv1(relu(norm1 x)))))."""

  def __init__(self, features: int, kernel_size: int = 3, padding: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(features, features, kernel_size, padding=padding)
    self.conv2 = nn.Conv2d(features, features, kernel_size, padding=padding)
    self.norm1, self.norm2 = BatchNorm2d(features), BatchNorm2d(features)

  def forward(self, x):
    return x + self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class ResBlock3d(nn.Module):
  """ResBlock2d in 3-D."""

  def __init__(self, features: int, kernel_size: int = 3, padding: int = 1):
    super().__init__()
    self.conv1 = nn.Conv3d(features, features, kernel_size, padding=padding)
    self.conv2 = nn.Conv3d(features, features, kernel_size, padding=padding)
    self.norm1, self.norm2 = BatchNorm3d(features), BatchNorm3d(features)

  def forward(self, x):
    return x + self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class UpBlock2d(nn.Module):
  """Nearest x2 upsampling, conv, BatchNorm, ReLU."""

  def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1):
    super().__init__()
    self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding)
    self.norm = BatchNorm2d(out_features)

  def forward(self, x):
    return F.relu(self.norm(self.conv(F.interpolate(x, scale_factor=2))))


class UpBlock3d(nn.Module):
  """Nearest upsampling of height and width only (depth kept), 3x3x3 conv, BatchNorm, ReLU."""

  def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1):
    super().__init__()
    self.conv = nn.Conv3d(in_features, out_features, kernel_size, padding=padding)
    self.norm = BatchNorm3d(out_features)

  def forward(self, x):
    return F.relu(self.norm(self.conv(F.interpolate(x, scale_factor=(1, 2, 2)))))


class DownBlock2d(nn.Module):
  """Conv, BatchNorm, ReLU, 2x2 average pooling."""

  def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1):
    super().__init__()
    self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding)
    self.norm = BatchNorm2d(out_features)
    self.pool = nn.AvgPool2d(kernel_size=(2, 2))

  def forward(self, x):
    return self.pool(F.relu(self.norm(self.conv(x))))


class DownBlock3d(nn.Module):
  """3x3x3 conv, BatchNorm, ReLU, (1, 2, 2) average pooling (depth kept)."""

  def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1):
    super().__init__()
    self.conv = nn.Conv3d(in_features, out_features, kernel_size, padding=padding)
    self.norm = BatchNorm3d(out_features)
    self.pool = nn.AvgPool3d(kernel_size=(1, 2, 2))

  def forward(self, x):
    return self.pool(F.relu(self.norm(self.conv(x))))


class SameBlock2d(nn.Module):
  """Conv, BatchNorm, ReLU (or LeakyReLU with torch's default slope 0.01)."""

  def __init__(self, in_features: int, out_features: int, kernel_size=3, padding=1, lrelu: bool = False):
    super().__init__()
    self.conv = nn.Conv2d(in_features, out_features, kernel_size, padding=padding)
    self.norm = BatchNorm2d(out_features)
    self.ac = nn.LeakyReLU() if lrelu else nn.ReLU()

  def forward(self, x):
    return self.ac(self.norm(self.conv(x)))


def _width(block_expansion: int, i: int, max_features: int) -> int:
  return min(max_features, block_expansion * (2**i))


class Encoder(nn.Module):
  """The 3-D hourglass encoder: DownBlock3d's, returning every resolution (input first) for the skips."""

  def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256):
    super().__init__()
    self.down_blocks = nn.ModuleList(
      DownBlock3d(
        in_features if i == 0 else _width(block_expansion, i, max_features),
        _width(block_expansion, i + 1, max_features),
      )  # fmt: skip
      for i in range(num_blocks)
    )

  def forward(self, x):
    outs = [x]
    for block in self.down_blocks:
      outs.append(block(outs[-1]))
    return outs


class Decoder(nn.Module):
  """The 3-D hourglass decoder: UpBlock3d's concatenating the encoder's skips, then conv + BatchNorm + ReLU at
  block_expansion + in_features channels."""

  def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256):
    super().__init__()
    blocks = []
    for i in reversed(range(num_blocks)):
      cin = (1 if i == num_blocks - 1 else 2) * _width(block_expansion, i + 1, max_features)
      blocks.append(UpBlock3d(cin, _width(block_expansion, i, max_features)))
    self.up_blocks = nn.ModuleList(blocks)
    self.out_filters = block_expansion + in_features
    self.conv = nn.Conv3d(self.out_filters, self.out_filters, kernel_size=3, padding=1)
    self.norm = BatchNorm3d(self.out_filters)

  def forward(self, skips):
    skips = list(skips)
    out = skips.pop()
    for block in self.up_blocks:
      out = torch.cat([block(out), skips.pop()], dim=1)
    return F.relu(self.norm(self.conv(out)))


class Hourglass(nn.Module):
  def __init__(self, block_expansion: int, in_features: int, num_blocks: int = 3, max_features: int = 256):
    super().__init__()
    self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
    self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
    self.out_filters = self.decoder.out_filters

  def forward(self, x):
    return self.decoder(self.encoder(x))


class KPHourglass(nn.Module):
  """2-D DownBlock2d's, a 1x1 conv to reshape_features channels viewed as (C / depth, depth) 3-D features, 3-D
  UpBlock3d's (names down0.., up0.. inside Sequentials, as there)."""

  def __init__(self, block_expansion: int, in_features: int, reshape_features: int, reshape_depth: int,
               num_blocks: int = 3, max_features: int = 256):  # fmt: skip
    super().__init__()
    self.down_blocks = nn.Sequential()
    for i in range(num_blocks):
      cin = in_features if i == 0 else _width(block_expansion, i, max_features)
      self.down_blocks.add_module(f"down{i}", DownBlock2d(cin, _width(block_expansion, i + 1, max_features)))
    self.conv = nn.Conv2d(_width(block_expansion, num_blocks, max_features), reshape_features, kernel_size=1)
    self.up_blocks = nn.Sequential()
    for i in range(num_blocks):
      cin, cout = (_width(block_expansion, num_blocks - i - j, max_features) for j in (0, 1))
      self.up_blocks.add_module(f"up{i}", UpBlock3d(cin, cout))
    self.reshape_depth = reshape_depth
    self.out_filters = _width(block_expansion, 0, max_features)

  def forward(self, x):
    out = self.conv(self.down_blocks(x))
    n, c, h, w = out.shape
    return self.up_blocks(out.view(n, c // self.reshape_depth, self.reshape_depth, h, w))


class AntiAliasInterpolation2d(nn.Module):
  """Gaussian blur (sigma = (1/scale - 1)/2, size 2 round(4 sigma) + 1, a fixed buffer `weight`) then subsampling
  by int(1/scale)."""

  def __init__(self, channels: int, scale: float):
    super().__init__()
    sigma = (1 / scale - 1) / 2
    size = 2 * round(sigma * 4) + 1
    self.ka = size // 2
    self.kb = self.ka - 1 if size % 2 == 0 else self.ka
    t = torch.arange(size, dtype=torch.float32)
    g = torch.exp(-((t - (size - 1) / 2) ** 2) / (2 * sigma**2))
    kernel = g[:, None] * g[None, :]
    kernel = kernel / kernel.sum()
    self.register_buffer("weight", kernel[None, None].repeat(channels, 1, 1, 1))
    self.groups, self.scale, self.step = channels, scale, int(1 / scale)

  def forward(self, x):
    if self.scale == 1.0:
      return x
    out = F.conv2d(F.pad(x, (self.ka, self.kb, self.ka, self.kb)), self.weight, groups=self.groups)
    return out[:, :, :: self.step, :: self.step]


# ----------------------------------------------------------------------------------------------------------
# Keypoint detector and head-pose/expression estimator (modules/keypoint_detector.py)


class KPDetector(nn.Module):
  """Canonical keypoints: soft-argmax (temperature) of 3-D heatmaps from KPHourglass + a 3x3x3 conv."""

  def __init__(self, block_expansion, feature_channel, num_kp, image_channel, max_features, reshape_channel,
               reshape_depth, num_blocks, temperature, estimate_jacobian=False, scale_factor=1,
               single_jacobian_map=False):  # fmt: skip
    super().__init__()
    del feature_channel
    self.predictor = KPHourglass(block_expansion, image_channel, reshape_channel, reshape_depth, num_blocks,
                                 max_features)  # fmt: skip
    self.kp = nn.Conv3d(self.predictor.out_filters, num_kp, kernel_size=3, padding=1)
    self.num_jacobian_maps = (1 if single_jacobian_map else num_kp) if estimate_jacobian else 0
    if estimate_jacobian:  # identity Jacobians at initialisation, as there
      self.jacobian = nn.Conv3d(self.predictor.out_filters, 9 * self.num_jacobian_maps, kernel_size=3, padding=1)
      with torch.no_grad():
        self.jacobian.weight.zero_()
        self.jacobian.bias.copy_(torch.eye(3).flatten().repeat(self.num_jacobian_maps))
    else:
      self.jacobian = None
    self.temperature, self.scale_factor = temperature, scale_factor
    if scale_factor != 1:
      self.down = AntiAliasInterpolation2d(image_channel, scale_factor)

  def forward(self, x):
    if self.scale_factor != 1:
      x = self.down(x)
    features = self.predictor(x)
    logits = self.kp(features)
    n, k, d, h, w = logits.shape
    heatmap = F.softmax(logits.view(n, k, -1) / self.temperature, dim=2).view(n, k, d, h, w)
    grid = coordinate_grid_3d(d, h, w, like=heatmap)
    out = {"value": (heatmap[..., None] * grid).sum(dim=(2, 3, 4))}
    if self.jacobian is not None:
      jac = self.jacobian(features).reshape(n, self.num_jacobian_maps, 9, d, h, w)
      out["jacobian"] = (heatmap.unsqueeze(2) * jac).view(n, k, 9, -1).sum(-1).view(n, k, 3, 3)
    return out


class HEEstimator(nn.Module):
  """Head pose (yaw / pitch / roll bin logits, translation) and expression deltas from a ResNet-style trunk.

  The repository's quirk is kept: `yaw` is fc_roll's output and `roll` is fc_yaw's (the released checkpoint was
  trained that way, so its fc_roll holds the yaw classifier)."""

  def __init__(self, block_expansion, feature_channel, num_kp, image_channel, max_features, num_bins=66,
               estimate_jacobian=True, num_bottlenecks: Sequence[int] = (3, 3, 5, 2)):  # fmt: skip
    super().__init__()
    del feature_channel, estimate_jacobian
    w = [min(max_features, block_expansion * 4 * 2**i) for i in range(4)]  # 256, 512, 1024, 2048 at 64 / 2048
    self.conv1 = nn.Conv2d(image_channel, block_expansion, kernel_size=7, padding=3, stride=2)
    self.norm1 = BatchNorm2d(block_expansion)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.conv2, self.norm2 = nn.Conv2d(block_expansion, w[0], kernel_size=1), BatchNorm2d(w[0])
    self.block1 = nn.Sequential()
    for i in range(num_bottlenecks[0]):
      self.block1.add_module(f"b1_{i}", ResBottleneck(w[0], stride=1))
    for stage, (cin, cout) in enumerate(zip(w[:-1], w[1:])):  # conv3/norm3/block2/block3, conv4.., conv5..
      c, b = stage + 3, 2 * stage + 2
      setattr(self, f"conv{c}", nn.Conv2d(cin, cout, kernel_size=1))
      setattr(self, f"norm{c}", BatchNorm2d(cout))
      setattr(self, f"block{b}", ResBottleneck(cout, stride=2))
      seq = nn.Sequential()
      for i in range(num_bottlenecks[stage + 1]):
        seq.add_module(f"b{b + 1}_{i}", ResBottleneck(cout, stride=1))
      setattr(self, f"block{b + 1}", seq)
    self.fc_roll = nn.Linear(w[-1], num_bins)
    self.fc_pitch = nn.Linear(w[-1], num_bins)
    self.fc_yaw = nn.Linear(w[-1], num_bins)
    self.fc_t = nn.Linear(w[-1], 3)
    self.fc_exp = nn.Linear(w[-1], 3 * num_kp)

  def features(self, x):
    out = self.maxpool(F.relu(self.norm1(self.conv1(x))))
    out = self.block1(F.relu(self.norm2(self.conv2(out))))
    for stage in range(3):
      c, b = stage + 3, 2 * stage + 2
      out = F.relu(getattr(self, f"norm{c}")(getattr(self, f"conv{c}")(out)))
      out = getattr(self, f"block{b + 1}")(getattr(self, f"block{b}")(out))
    return F.adaptive_avg_pool2d(out, 1).flatten(1)

  def forward(self, x):
    f = self.features(x)
    return {"yaw": self.fc_roll(f), "pitch": self.fc_pitch(f), "roll": self.fc_yaw(f), "t": self.fc_t(f),
            "exp": self.fc_exp(f)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Dense motion (modules/dense_motion.py)


class DenseMotionNetwork(nn.Module):
  """Per-keypoint sparse motions (identity + background), the compressed feature warped by each, a 3-D hourglass
  on [heatmap difference, warped features] -> softmax masks -> the dense deformation; optional occlusion map."""

  def __init__(self, block_expansion, num_blocks, max_features, num_kp, feature_channel, reshape_depth, compress,
               estimate_occlusion_map=False):  # fmt: skip
    super().__init__()
    self.hourglass = Hourglass(block_expansion, (num_kp + 1) * (compress + 1), num_blocks, max_features)
    self.mask = nn.Conv3d(self.hourglass.out_filters, num_kp + 1, kernel_size=7, padding=3)
    self.compress = nn.Conv3d(feature_channel, compress, kernel_size=1)
    self.norm = BatchNorm3d(compress)
    if estimate_occlusion_map:
      self.occlusion = nn.Conv2d(self.hourglass.out_filters * reshape_depth, 1, kernel_size=7, padding=3)
    else:
      self.occlusion = None
    self.num_kp = num_kp

  def sparse_motions(self, feature, kp_driving, kp_source):
    """(N, K+1, d, h, w, 3): the identity grid (background) and, per keypoint, z - kp_driving + kp_source."""
    n, _, d, h, w = feature.shape
    grid = coordinate_grid_3d(d, h, w, like=feature)[None, None]
    moved = grid - kp_driving["value"][:, :, None, None, None, :] + kp_source["value"][:, :, None, None, None, :]
    if kp_driving.get("jacobian") is not None:  # FOMM's first-order term; the vox-256 config has none
      jac = kp_source["jacobian"] @ torch.inverse(kp_driving["jacobian"])
      local = grid - kp_driving["value"][:, :, None, None, None, :]
      moved = (jac[:, :, None, None, None] @ local[..., None])[..., 0] + kp_source["value"][:, :, None, None, None, :]
    return torch.cat([grid.expand(n, 1, d, h, w, 3), moved], dim=1)

  def deformed_features(self, feature, motions):
    n, c, d, h, w = feature.shape
    k1 = self.num_kp + 1
    rep = feature[:, None].expand(n, k1, c, d, h, w).reshape(n * k1, c, d, h, w)
    out = F.grid_sample(rep, motions.reshape(n * k1, d, h, w, 3), align_corners=False)
    return out.view(n, k1, c, d, h, w)

  def forward(self, feature, kp_driving, kp_source):
    n, _, d, h, w = feature.shape
    feature = F.relu(self.norm(self.compress(feature)))
    motions = self.sparse_motions(feature, kp_driving, kp_source)
    deformed = self.deformed_features(feature, motions)
    heat = (keypoint_gaussians(kp_driving["value"], (d, h, w), 0.01)
            - keypoint_gaussians(kp_source["value"], (d, h, w), 0.01))  # fmt: skip
    heat = torch.cat([torch.zeros_like(heat[:, :1]), heat], dim=1)[:, :, None]  # (N, K+1, 1, d, h, w)
    prediction = self.hourglass(torch.cat([heat, deformed], dim=2).view(n, -1, d, h, w))
    mask = F.softmax(self.mask(prediction), dim=1)
    deformation = (motions.permute(0, 1, 5, 2, 3, 4) * mask[:, :, None]).sum(dim=1).permute(0, 2, 3, 4, 1)
    out = {"mask": mask, "deformation": deformation}
    if self.occlusion is not None:
      out["occlusion_map"] = torch.sigmoid(self.occlusion(prediction.reshape(n, -1, h, w)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Generator (modules/generator.py): the parts MMFA keeps, and both released decoders for their keys


class SPADE(nn.Module):
  """Parameter-free InstanceNorm modulated by (1 + gamma, beta) convolved from the (resized) segmentation input."""

  def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128):
    super().__init__()
    self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
    self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, kernel_size=3, padding=1), nn.ReLU())
    self.mlp_gamma = nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)
    self.mlp_beta = nn.Conv2d(hidden, norm_nc, kernel_size=3, padding=1)

  def forward(self, x, seg):
    act = self.mlp_shared(F.interpolate(seg, size=x.shape[2:], mode="nearest"))
    return self.param_free_norm(x) * (1 + self.mlp_gamma(act)) + self.mlp_beta(act)


class SPADEResnetBlock(nn.Module):
  def __init__(self, fin: int, fout: int, label_nc: int, hidden: int = 128):
    super().__init__()
    self.learned_shortcut = fin != fout
    mid = min(fin, fout)
    sn = nn.utils.spectral_norm
    self.conv_0 = sn(nn.Conv2d(fin, mid, kernel_size=3, padding=1))
    self.conv_1 = sn(nn.Conv2d(mid, fout, kernel_size=3, padding=1))
    if self.learned_shortcut:
      self.conv_s = sn(nn.Conv2d(fin, fout, kernel_size=1, bias=False))
    self.norm_0, self.norm_1 = SPADE(fin, label_nc, hidden), SPADE(mid, label_nc, hidden)
    if self.learned_shortcut:
      self.norm_s = SPADE(fin, label_nc, hidden)

  def forward(self, x, seg):
    skip = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
    dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
    return skip + self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))


class SPADEDecoder(nn.Module):
  """The released generator's decoder (fc, G_middle_0..5, up_0, up_1, conv_img); not used by MMFA."""

  def __init__(self, ic: int = 256, oc: int = 64, hidden: int = 128):
    super().__init__()
    self.fc = nn.Conv2d(ic, 2 * ic, 3, padding=1)
    for i in range(6):
      setattr(self, f"G_middle_{i}", SPADEResnetBlock(2 * ic, 2 * ic, ic, hidden))
    self.up_0 = SPADEResnetBlock(2 * ic, ic, ic, hidden)
    self.up_1 = SPADEResnetBlock(ic, oc, ic, hidden)
    self.conv_img = nn.Conv2d(oc, 3, 3, padding=1)
    self.up = nn.Upsample(scale_factor=2)

  def forward(self, feature):
    x = self.fc(feature)
    for i in range(6):
      x = getattr(self, f"G_middle_{i}")(x, feature)
    x = self.up_1(self.up(self.up_0(self.up(x), feature)), feature)
    return torch.sigmoid(self.conv_img(F.leaky_relu(x, 0.2)))


class OcclusionAwareGenerator(nn.Module):
  """face-vid2vid's generator: appearance encoder (first, down_blocks, second, reshape, resblocks_3d), dense motion,
  warp, third + fourth (3-D -> 2-D), occlusion, then a decoder: kind "spade" (the Vox-256-New release:
  OcclusionAwareSPADEGenerator, `first` 3x3) or "original" (Beta: OcclusionAwareGenerator, `first` 7x7,
  resblocks_2d / up_blocks / final)."""

  def __init__(self, image_channel, feature_channel, num_kp, block_expansion, max_features, num_down_blocks,
               reshape_channel, reshape_depth, num_resblocks, estimate_occlusion_map=False, dense_motion_params=None,
               estimate_jacobian=False, kind: str = "spade", spade_hidden: int = 128):  # fmt: skip
    super().__init__()
    del estimate_jacobian
    if kind not in ("spade", "original"):
      raise ValueError(f"generator kind {kind!r}: expected 'spade' or 'original'")
    self.kind = kind
    self.dense_motion_network = None
    if dense_motion_params is not None:
      self.dense_motion_network = DenseMotionNetwork(num_kp=num_kp, feature_channel=feature_channel,
                                                     estimate_occlusion_map=estimate_occlusion_map,
                                                     **dense_motion_params)  # fmt: skip
    k = 3 if kind == "spade" else 7
    self.first = SameBlock2d(image_channel, block_expansion, kernel_size=k, padding=k // 2)
    self.down_blocks = nn.ModuleList(
      DownBlock2d(_width(block_expansion, i, max_features), _width(block_expansion, i + 1, max_features))
      for i in range(num_down_blocks)
    )
    self.second = nn.Conv2d(_width(block_expansion, num_down_blocks, max_features), max_features, kernel_size=1)
    self.reshape_channel, self.reshape_depth = reshape_channel, reshape_depth
    self.resblocks_3d = nn.Sequential()
    for i in range(num_resblocks):
      self.resblocks_3d.add_module(f"3dr{i}", ResBlock3d(reshape_channel))
    out_features = block_expansion * 2**num_down_blocks
    self.third = SameBlock2d(max_features, out_features, kernel_size=3, padding=1, lrelu=True)
    self.fourth = nn.Conv2d(out_features, out_features, kernel_size=1)
    if kind == "spade":
      self.decoder = SPADEDecoder(out_features, block_expansion, spade_hidden)
    else:
      self.resblocks_2d = nn.Sequential()
      for i in range(num_resblocks):
        self.resblocks_2d.add_module(f"2dr{i}", ResBlock2d(out_features))
      self.up_blocks = nn.ModuleList(
        UpBlock2d(
          max(block_expansion, block_expansion * 2 ** (num_down_blocks - i)),
          max(block_expansion, block_expansion * 2 ** (num_down_blocks - i - 1)),
        )  # fmt: skip
        for i in range(num_down_blocks)
      )
      self.final = nn.Conv2d(block_expansion, image_channel, kernel_size=7, padding=3)
    self.estimate_occlusion_map, self.image_channel = estimate_occlusion_map, image_channel

  def appearance(self, image):
    """The source's 3-D appearance feature volume f_s (N, reshape_channel, reshape_depth, h, w)."""
    out = self.first(image)
    for block in self.down_blocks:
      out = block(out)
    out = self.second(out)
    n, _, h, w = out.shape
    return self.resblocks_3d(out.view(n, self.reshape_channel, self.reshape_depth, h, w))

  @staticmethod
  def deform(volume, deformation):
    """grid_sample of the volume at the deformation (resized trilinearly first when its size differs, as there)."""
    if deformation.shape[1:4] != volume.shape[2:]:
      deformation = F.interpolate(deformation.permute(0, 4, 1, 2, 3), size=volume.shape[2:], mode="trilinear")
      deformation = deformation.permute(0, 2, 3, 4, 1)
    return F.grid_sample(volume, deformation, align_corners=False)

  def to_2d(self, warped):
    """third + fourth on the warped volume flattened to (N, C * D, h, w) (channel c * D + d)."""
    n, c, d, h, w = warped.shape
    return self.fourth(self.third(warped.reshape(n, c * d, h, w)))

  def decode(self, out):
    if self.kind == "spade":
      return self.decoder(out)
    out = self.resblocks_2d(out)
    for block in self.up_blocks:
      out = block(out)
    return torch.sigmoid(self.final(out))

  def forward(self, source_image, kp_driving, kp_source):
    feature = self.appearance(source_image)
    motion = self.dense_motion_network(feature=feature, kp_driving=kp_driving, kp_source=kp_source)
    out = self.to_2d(self.deform(feature, motion["deformation"]))
    result = {"mask": motion["mask"]}
    occlusion = motion.get("occlusion_map")
    if occlusion is not None:
      if occlusion.shape[2:] != out.shape[2:]:
        occlusion = F.interpolate(occlusion, size=out.shape[2:], mode="bilinear")
      out = out * occlusion
      result["occlusion_map"] = occlusion
    result["prediction"] = self.decode(out)
    return result


# ----------------------------------------------------------------------------------------------------------
# Discriminator (modules/discriminator.py)


class DiscriminatorDownBlock(nn.Module):
  """4x4 valid conv (spectral-normed when sn), InstanceNorm(affine) except in the first block, LeakyReLU 0.2,
  2x2 average pooling except in the last block (discriminator.py's DownBlock2d)."""

  def __init__(self, in_features: int, out_features: int, norm: bool = False, kernel_size: int = 4,
               pool: bool = False, sn: bool = False):  # fmt: skip
    super().__init__()
    self.conv = nn.Conv2d(in_features, out_features, kernel_size=kernel_size)
    if sn:
      self.conv = nn.utils.spectral_norm(self.conv)
    self.norm = nn.InstanceNorm2d(out_features, affine=True) if norm else None
    self.pool = pool

  def forward(self, x):
    out = self.conv(x)
    if self.norm is not None:
      out = self.norm(out)
    out = F.leaky_relu(out, 0.2)
    return F.avg_pool2d(out, (2, 2)) if self.pool else out


class Discriminator(nn.Module):
  """Pix2Pix-style patch discriminator: feature maps of every block and a 1x1-conv prediction map."""

  def __init__(self, num_channels=3, block_expansion=64, num_blocks=4, max_features=512, sn=False, **kwargs):
    super().__init__()
    self.down_blocks = nn.ModuleList(
      DiscriminatorDownBlock(
        num_channels if i == 0 else _width(block_expansion, i, max_features),
        _width(block_expansion, i + 1, max_features),
        norm=i != 0,
        pool=i != num_blocks - 1,
        sn=sn,
      )  # fmt: skip
      for i in range(num_blocks)
    )
    self.conv = nn.Conv2d(_width(block_expansion, num_blocks, max_features), 1, kernel_size=1)
    if sn:
      self.conv = nn.utils.spectral_norm(self.conv)

  def forward(self, x):
    maps = []
    for block in self.down_blocks:
      x = block(x)
      maps.append(x)
    return maps, self.conv(x)


class MultiScaleDiscriminator(nn.Module):
  """One Discriminator per scale, under discs[str(scale) with '.' -> '-'] ('1', '0-5', ...)."""

  def __init__(self, scales=(), **kwargs):
    super().__init__()
    self.scales = scales
    self.discs = nn.ModuleDict({str(s).replace(".", "-"): Discriminator(**kwargs) for s in scales})

  def forward(self, x):
    out = {}
    for name, disc in self.discs.items():
      scale = name.replace("-", ".")
      maps, prediction = disc(x[f"prediction_{scale}"])
      out[f"feature_maps_{scale}"], out[f"prediction_map_{scale}"] = maps, prediction
    return out


# ----------------------------------------------------------------------------------------------------------
# Building from a config's model_params, and the checkpoint file


def build(model_params: dict, generator_kind: str = "spade", spade_hidden: int = 128) -> dict[str, nn.Module]:
  """{'generator', 'discriminator', 'kp_detector', 'he_estimator'} from a face-vid2vid config's `model_params`
  (run.py's constructors: each section plus common_params)."""
  common = model_params["common_params"]
  return {
    "generator": OcclusionAwareGenerator(
      **model_params["generator_params"], **common, kind=generator_kind, spade_hidden=spade_hidden
    ),  # fmt: skip
    "discriminator": MultiScaleDiscriminator(**model_params["discriminator_params"], **common),
    "kp_detector": KPDetector(**model_params["kp_detector_params"], **common),
    "he_estimator": HEEstimator(**model_params["he_estimator_params"], **common),
  }


def save_checkpoint(modules: dict[str, nn.Module], path, epoch: int = 0, with_optimizers: bool = True) -> None:
  """torch.save in Logger.save_cpk's layout: a state dict per network, Adam states ('optimizer_<name>') and 'epoch'.
  The optimizers are fresh Adams (betas 0.5, 0.999 as train.py) with one zero-gradient step, so their state holds
  tensors as a trained file's does."""
  cpk = {name: m.state_dict() for name, m in modules.items()}
  if with_optimizers:
    for name, m in modules.items():
      opt = torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999))
      for p in m.parameters():
        p.grad = torch.zeros_like(p)
      opt.step()
      opt.zero_grad(set_to_none=True)
      cpk[f"optimizer_{name}"] = opt.state_dict()
  cpk["epoch"] = epoch
  torch.save(cpk, str(path))
