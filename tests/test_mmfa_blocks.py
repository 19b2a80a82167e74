"""MMFA's face-vid2vid blocks (mimajax/mmfa/blocks.py) against PyTorch on random inputs.

The references are torch primitives (F.grid_sample, F.interpolate, BatchNorm, Conv) and small torch compositions
of them written here from face-vid2vid's modules/util.py layout; weights are copied by name (conv weight ->
kernel transposed, BatchNorm weight/running_* -> scale/mean/var), so a wrong name, layout or order fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn as tnn

import mimajax  # noqa: F401  (flax's sharding mode)
from mimajax.mmfa import blocks

torch.manual_seed(0)


def nc_last(t: torch.Tensor) -> np.ndarray:
  """NC... torch tensor -> channels-last numpy."""
  a = t.detach().numpy()
  return np.moveaxis(a, 1, -1)


def nc_first(a) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1)))


def max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def randomise_(module: tnn.Module, seed: int = 0) -> tnn.Module:
  """Random BatchNorm affine and running statistics, so that scale / bias / mean / var mix-ups show."""
  g = torch.Generator().manual_seed(seed)
  for m in module.modules():
    if isinstance(m, (tnn.BatchNorm2d, tnn.BatchNorm3d)):
      n = m.num_features
      m.weight.data = 1 + 0.3 * torch.randn(n, generator=g)
      m.bias.data = 0.3 * torch.randn(n, generator=g)
      m.running_mean.data = 0.2 * torch.randn(n, generator=g)
      m.running_var.data = 1 + 0.5 * torch.rand(n, generator=g)
  return module


def load_from_torch(module: nnx.Module, reference: tnn.Module) -> None:
  """Copies a torch module's state into the nnx module with the same attribute names (lists as indices)."""
  for key, value in reference.state_dict().items():
    *path, leaf = key.split(".")
    if leaf == "num_batches_tracked":
      continue
    target = module
    for part in path:
      target = target[int(part)] if part.isdigit() else getattr(target, part)
    v = value.detach().numpy()
    if isinstance(target, blocks.BatchNorm):
      name = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}[leaf]
    elif leaf == "weight":  # conv (out, in, *k) -> (*k, in, out)
      name, v = "kernel", np.transpose(v, (*range(2, v.ndim), 1, 0))
    else:
      name = leaf
    variable = getattr(target, name)
    assert variable[...].shape == v.shape, f"{key}: {variable[...].shape} vs {v.shape}"
    variable[...] = jnp.asarray(v)


# ----------------------------------------------------------------------------- grid_sample


@pytest.mark.parametrize("rank", [2, 3])
def test_grid_sample_matches_torch_values_and_gradients(rank):
  rng = np.random.default_rng(rank)
  spatial, out = ((5, 7), (4, 6)) if rank == 2 else ((3, 5, 6), (2, 4, 5))
  x = rng.normal(size=(2, 4, *spatial)).astype(np.float32)
  # Beyond [-1, 1] on purpose: the zeros padding and the half-outside corners are part of the contract.
  grid = rng.uniform(-1.3, 1.3, size=(2, *out, rank)).astype(np.float32)
  cot = rng.normal(size=(2, 4, *out)).astype(np.float32)

  xt, gt = torch.tensor(x, requires_grad=True), torch.tensor(grid, requires_grad=True)
  yt = F.grid_sample(xt, gt, mode="bilinear", padding_mode="zeros", align_corners=False)
  (yt * torch.tensor(cot)).sum().backward()

  fn = blocks.grid_sample_2d if rank == 2 else blocks.grid_sample_3d
  x_last, cot_last = np.moveaxis(x, 1, -1), np.moveaxis(cot, 1, -1)
  y, vjp = jax.vjp(jax.jit(fn), jnp.asarray(x_last), jnp.asarray(grid))
  dx, dgrid = vjp(jnp.asarray(cot_last))

  err = max_err(y, nc_last(yt))
  assert err < 1e-5, f"grid_sample_{rank}d value max abs err {err:.3e}"
  err_dx = max_err(dx, nc_last(xt.grad))
  assert err_dx < 1e-5, f"grid_sample_{rank}d d/dinput max abs err {err_dx:.3e}"
  err_dg = max_err(dgrid, gt.grad.numpy())
  assert err_dg < 1e-4, f"grid_sample_{rank}d d/dgrid max abs err {err_dg:.3e}"


def test_grid_sample_at_pixel_centres_reproduces_the_input_and_coordinate_grids():
  rng = np.random.default_rng(0)
  vol = jnp.asarray(rng.normal(size=(1, 3, 4, 5, 2)).astype(np.float32))
  grid = blocks.make_coordinate_grid_3d((3, 4, 5))
  np.testing.assert_allclose(grid[1, 2, 3], [2 * 3 / 4 - 1, 2 * 2 / 3 - 1, 0.0], atol=1e-7)  # (x, y, z)
  np.testing.assert_allclose(blocks.make_coordinate_grid_2d((4, 5))[2, 3], [2 * 3 / 4 - 1, 2 * 2 / 3 - 1], atol=1e-7)
  # align_corners=False: pixel i's centre is -1 + (2 i + 1) / size (not face-vid2vid's grid, whose ends are +-1).
  d, h, w = 3, 4, 5
  centres = jnp.stack(
    jnp.broadcast_arrays(
      ((2 * jnp.arange(w) + 1) / w - 1)[None, None, :],
      ((2 * jnp.arange(h) + 1) / h - 1)[None, :, None],
      ((2 * jnp.arange(d) + 1) / d - 1)[:, None, None],
    ),
    -1,
  )[None]
  err = max_err(blocks.grid_sample_3d(vol, centres), vol)
  assert err < 1e-6, f"pixel-centre resampling max abs err {err:.3e}"


# ----------------------------------------------------------------------------- resampling


def test_interpolation_and_pooling_match_torch():
  rng = np.random.default_rng(1)
  x = torch.tensor(rng.normal(size=(2, 3, 6, 10)).astype(np.float32))
  v = torch.tensor(rng.normal(size=(2, 3, 4, 6, 8)).astype(np.float32))
  xl, vl = jnp.asarray(nc_last(x)), jnp.asarray(nc_last(v))
  errs = {
    "bilinear up": max_err(
      blocks.interpolate_linear(xl, (9, 16)), nc_last(F.interpolate(x, size=(9, 16), mode="bilinear"))
    ),
    "bilinear down": max_err(
      blocks.interpolate_linear(xl, (3, 4)), nc_last(F.interpolate(x, size=(3, 4), mode="bilinear"))
    ),
    "trilinear": max_err(
      blocks.interpolate_linear(vl, (5, 3, 16)), nc_last(F.interpolate(v, size=(5, 3, 16), mode="trilinear"))
    ),
    "nearest 2d": max_err(blocks.upsample_nearest(xl, (2, 2)), nc_last(F.interpolate(x, scale_factor=2))),
    "nearest 3d": max_err(blocks.upsample_nearest(vl, (1, 2, 2)), nc_last(F.interpolate(v, scale_factor=(1, 2, 2)))),
    "avgpool 2d": max_err(blocks.avg_pool(xl, (2, 2)), nc_last(F.avg_pool2d(x, 2))),
    "avgpool 3d": max_err(blocks.avg_pool(vl, (1, 2, 2)), nc_last(F.avg_pool3d(v, (1, 2, 2)))),
  }
  assert max(errs.values()) < 1e-5, f"max abs errs {errs}"


@pytest.mark.parametrize("scale", [0.5, 0.25])
def test_anti_alias_interpolation_matches_torch(scale):
  x = torch.rand(2, 3, 32, 32)
  # face-vid2vid's kernel, built in torch: Gaussian of sigma (1/scale - 1)/2 and size 2 round(4 sigma) + 1.
  sigma = (1 / scale - 1) / 2
  size = 2 * round(sigma * 4) + 1
  m = torch.arange(size, dtype=torch.float32)
  g = torch.exp(-((m - (size - 1) / 2) ** 2) / (2 * sigma**2))
  kernel = g[:, None] * g[None, :]
  kernel = (kernel / kernel.sum()).expand(3, 1, size, size)
  ka = size // 2
  ref = F.conv2d(F.pad(x, (ka, ka, ka, ka)), kernel, groups=3)[:, :, :: int(1 / scale), :: int(1 / scale)]
  out = blocks.AntiAliasInterpolation2d(3, scale)(jnp.asarray(nc_last(x)))
  assert out.shape == (2, int(32 * scale), int(32 * scale), 3)
  err = max_err(out, nc_last(ref))
  assert err < 1e-6, f"AntiAliasInterpolation2d({scale}) max abs err {err:.3e}"


# ----------------------------------------------------------------------------- layers


def test_conv_and_batchnorm_train_and_eval_match_torch():
  x = torch.randn(2, 3, 4, 6, 5)
  conv_t = tnn.Conv3d(3, 5, 3, padding=1)
  bn_t = randomise_(tnn.BatchNorm3d(5))
  conv = blocks.Conv3D(3, 5, 3, padding=1, rngs=nnx.Rngs(0))
  bn = blocks.BatchNorm(5)
  load_from_torch(conv, conv_t)
  load_from_torch(bn, bn_t)

  xl = jnp.asarray(nc_last(x))
  errs = {"conv3d": max_err(conv(xl), nc_last(conv_t(x)))}
  h, ht = conv(xl), conv_t(x)
  for step in range(2):  # train: batch statistics; running averages updated (torch: unbiased variance)
    errs[f"bn train {step}"] = max_err(bn(h * (step + 1)), nc_last(bn_t(ht * (step + 1))))
  errs["running mean"] = max_err(bn.mean[...], bn_t.running_mean.numpy())
  errs["running var"] = max_err(bn.var[...], bn_t.running_var.numpy())
  bn.eval()
  bn_t.eval()
  errs["bn eval"] = max_err(bn(h), nc_last(bn_t(ht)))
  assert max(errs.values()) < 1e-5, f"max abs errs {errs}"
  # An eval step leaves the statistics alone.
  before = np.asarray(bn.mean[...])
  bn(h + 1.0)
  np.testing.assert_array_equal(bn.mean[...], before)

  conv2_t = tnn.Conv2d(4, 6, 7, stride=2, padding=3)
  conv2 = blocks.Conv2D(4, 6, 7, stride=2, padding=3, rngs=nnx.Rngs(1))
  load_from_torch(conv2, conv2_t)
  y = torch.randn(2, 4, 9, 12)
  err = max_err(conv2(jnp.asarray(nc_last(y))), nc_last(conv2_t(y)))
  assert err < 1e-5, f"conv2d stride 2 max abs err {err:.3e}"


def test_torch_default_init_bounds():
  conv = blocks.Conv3D(6, 4, 3, rngs=nnx.Rngs(0))
  bound = 1 / np.sqrt(6 * 27)
  k, b = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.8 * bound and np.abs(b).max() <= bound


# ----------------------------------------------------------------------------- blocks vs torch compositions


class TorchResBottleneck(tnn.Module):
  def __init__(self, c, stride):
    super().__init__()
    self.conv1, self.conv2 = tnn.Conv2d(c, c // 4, 1), tnn.Conv2d(c // 4, c // 4, 3, padding=1, stride=stride)
    self.conv3 = tnn.Conv2d(c // 4, c, 1)
    self.norm1, self.norm2, self.norm3 = tnn.BatchNorm2d(c // 4), tnn.BatchNorm2d(c // 4), tnn.BatchNorm2d(c)
    self.skip, self.norm4 = tnn.Conv2d(c, c, 1, stride=stride), tnn.BatchNorm2d(c)

  def forward(self, x):
    out = F.relu(self.norm1(self.conv1(x)))
    out = F.relu(self.norm2(self.conv2(out)))
    out = self.norm3(self.conv3(out))
    return F.relu(out + self.norm4(self.skip(x)))


class TorchResBlock3d(tnn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv1, self.conv2 = tnn.Conv3d(c, c, 3, padding=1), tnn.Conv3d(c, c, 3, padding=1)
    self.norm1, self.norm2 = tnn.BatchNorm3d(c), tnn.BatchNorm3d(c)

  def forward(self, x):
    return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x)))))) + x


class TorchConvNorm(tnn.Module):
  """UpBlock3d / DownBlock2d / SameBlock2d(lrelu): conv + BN with the block's resampling around them."""

  def __init__(self, kind, cin, cout):
    super().__init__()
    self.kind = kind
    self.conv = (tnn.Conv3d if kind == "up3d" else tnn.Conv2d)(cin, cout, 3, padding=1)
    self.norm = (tnn.BatchNorm3d if kind == "up3d" else tnn.BatchNorm2d)(cout)

  def forward(self, x):
    if self.kind == "up3d":
      return F.relu(self.norm(self.conv(F.interpolate(x, scale_factor=(1, 2, 2)))))
    if self.kind == "down2d":
      return F.avg_pool2d(F.relu(self.norm(self.conv(x))), (2, 2))
    return F.leaky_relu(self.norm(self.conv(x)))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_blocks_match_torch_compositions(mode):
  rngs = nnx.Rngs(0)
  cases = {
    "ResBottleneck": (blocks.ResBottleneck(16, 2, rngs=rngs), TorchResBottleneck(16, 2), (2, 16, 8, 8)),
    "ResBlock3d": (blocks.ResBlock3d(4, rngs=rngs), TorchResBlock3d(4), (2, 4, 3, 6, 6)),
    "UpBlock3d": (blocks.UpBlock3d(4, 6, rngs=rngs), TorchConvNorm("up3d", 4, 6), (2, 4, 3, 4, 4)),
    "DownBlock2d": (blocks.DownBlock2d(3, 5, rngs=rngs), TorchConvNorm("down2d", 3, 5), (2, 3, 8, 8)),
    "SameBlock2d lrelu": (blocks.SameBlock2d(3, 5, lrelu=True, rngs=rngs), TorchConvNorm("same", 3, 5), (2, 3, 6, 6)),
  }
  errs = {}
  for name, (ours, ref, shape) in cases.items():
    randomise_(ref, seed=len(name))
    load_from_torch(ours, ref)
    if mode == "eval":
      ours.eval()
      ref.eval()
    else:
      ref.train()
    x = torch.randn(*shape)
    out = nnx.jit(lambda m, v: m(v))(ours, jnp.asarray(nc_last(x)))
    errs[name] = max_err(out, nc_last(ref(x)))
    if mode == "train":  # the running statistics moved as torch's
      first_norm = [m for m in ref.modules() if isinstance(m, (tnn.BatchNorm2d, tnn.BatchNorm3d))][0]
      ours_norm = ours.norm1 if hasattr(ours, "norm1") else ours.norm
      errs[name + " running var"] = max_err(ours_norm.var[...], first_norm.running_var.numpy())
  assert max(errs.values()) < 1e-4, f"{mode} max abs errs {errs}"


def test_hourglasses_shapes_and_reshape_layout():
  rngs = nnx.Rngs(0)
  hg = blocks.Hourglass(4, 6, num_blocks=2, max_features=16, rngs=rngs)
  call = nnx.jit(lambda m, v: m(v))
  out = call(hg, jnp.ones((2, 3, 8, 8, 6)))
  assert out.shape == (2, 3, 8, 8, 4 + 6) and hg.out_filters == 10
  kph = blocks.KPHourglass(4, 3, reshape_features=16 * 2, reshape_depth=2, num_blocks=2, max_features=16, rngs=rngs)
  assert call(kph, jnp.ones((2, 16, 16, 3))).shape == (2, 2, 16, 16, 4)
  with pytest.raises(ValueError, match="reshape_features"):
    blocks.KPHourglass(4, 3, reshape_features=30, reshape_depth=2, num_blocks=2, max_features=16, rngs=rngs)
  # torch's view(bs, c, d, h, w) of an NCHW map: channel index = c * D + d, and back.
  t = torch.arange(2 * 12 * 2 * 3, dtype=torch.float32).reshape(2, 12, 2, 3)
  vol = blocks.channels_to_volume(jnp.asarray(nc_last(t)), 4)
  np.testing.assert_array_equal(vol, nc_last(t.view(2, 3, 4, 2, 3)))
  np.testing.assert_array_equal(blocks.volume_to_channels(vol), nc_last(t))


def test_kp2gaussian_matches_formula():
  kp = jnp.asarray([[[0.2, -0.4, 0.1]]])
  heat = blocks.kp2gaussian(kp, (3, 4, 5), 0.01)
  grid = np.asarray(blocks.make_coordinate_grid_3d((3, 4, 5)))
  expected = np.exp(-0.5 * ((grid - np.asarray(kp[0, 0])) ** 2).sum(-1) / 0.01)
  assert heat.shape == (1, 3, 4, 5, 1)
  np.testing.assert_allclose(heat[0, ..., 0], expected, rtol=1e-5, atol=1e-7)
