"""MMFA's face-vid2vid networks (keypoint detector, head estimator, appearance, dense motion, multi-scale generator,
discriminator) at tiny sizes: shapes, the properties that hold exactly, train vs eval, jit + grad, and the
discriminator's spectral norm against torch.nn.utils.spectral_norm."""

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
from mimajax.mmfa import blocks, dense_motion, discriminator, generator
from mimajax.mmfa.appearance import AppearanceFeatureExtractor
from mimajax.mmfa.dense_motion import DenseMotionNetwork
from mimajax.mmfa.discriminator import MultiScaleDiscriminator
from mimajax.mmfa.generator import MultiScaleGenerator
from mimajax.mmfa.keypoint_detector import CanonicalKeypointDetector, HeadEstimator, heatmap_to_keypoints

K, SIZE, DEPTH, CHANNELS = 4, 32, 4, 8  # keypoints, image size, feature volume depth and channels
KP = dict(block_expansion=8, max_features=32, num_blocks=2, reshape_channel=32 * 4, reshape_depth=4, temperature=0.1,
          scale_factor=0.5)  # fmt: skip
HEAD = dict(block_expansion=2, max_features=16, num_bins=66, num_bottlenecks=(1, 0, 0, 0))
GEN = dict(block_expansion=8, max_features=CHANNELS * DEPTH, num_down_blocks=2, reshape_channel=CHANNELS,
           reshape_depth=DEPTH, num_resblocks=1, estimate_occlusion_map=True)  # fmt: skip
MOTION = dict(block_expansion=8, max_features=32, num_blocks=2, reshape_depth=DEPTH, compress=2)


def max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def images(n: int = 2, size: int = SIZE, seed: int = 0) -> jax.Array:
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3))


@pytest.fixture(scope="module")
def nets():
  rngs = nnx.Rngs(0)
  return dict(
    kp=CanonicalKeypointDetector(num_kp=K, image_channel=3, feature_channel=CHANNELS, **KP, rngs=rngs),
    head=HeadEstimator(**HEAD, rngs=rngs),
    appearance=AppearanceFeatureExtractor(image_channel=3, **GEN, rngs=rngs),
    motion=DenseMotionNetwork(num_kp=K, feature_channel=CHANNELS, estimate_occlusion_map=True, **MOTION, rngs=rngs),
    generator=MultiScaleGenerator(image_channel=3, **GEN, rngs=rngs),
  )


# One jitted caller for every test: its compilations are cached by the module's graph and the input shapes.
call = nnx.jit(lambda module, *args: module(*args))


# ----------------------------------------------------------------------------- keypoints and head


def test_keypoints_are_the_heatmap_expectation_inside_the_cube(nets):
  # A peaked heatmap's expectation is its voxel's coordinate; a flat one's the grid's mean (0).
  logits = jnp.zeros((1, 3, 4, 5, 2)).at[0, 2, 1, 3, 0].set(10.0)
  kp = heatmap_to_keypoints(logits, temperature=0.1)
  np.testing.assert_allclose(kp[0, 0], [2 * 3 / 4 - 1, 2 * 1 / 3 - 1, 1.0], atol=1e-6)
  np.testing.assert_allclose(kp[0, 1], [0.0, 0.0, 0.0], atol=1e-6)

  x_c = call(nets["kp"], images())
  assert x_c.shape == (2, K, 3)
  assert float(jnp.abs(x_c).max()) <= 1.0
  assert nets["kp"].predictor.up_blocks[0].conv.kernel.shape == (3, 3, 3, 32, 16)  # (kd, kh, kw, in, out)
  with pytest.raises(ValueError, match="jacobian"):
    CanonicalKeypointDetector(num_kp=K, estimate_jacobian=True, **KP, rngs=nnx.Rngs(0))


def test_head_estimator_outputs_scale_one_at_init_and_yaw_from_fc_roll(nets):
  head = nets["head"]
  out = call(head, images())
  assert {k: v.shape for k, v in out.items()} == dict(
    yaw=(2, 66), pitch=(2, 66), roll=(2, 66), translation=(2, 3), scale=(2,)
  )
  np.testing.assert_array_equal(out["scale"], np.ones(2, np.float32))  # fc_scale zero-initialised: s = exp(0)
  assert not hasattr(head, "fc_exp")
  # face-vid2vid's naming: yaw is fc_roll's output, roll is fc_yaw's.
  saved = head.fc_roll.kernel[...], head.fc_roll.bias[...]
  head.fc_roll.kernel[...] = jnp.zeros_like(saved[0])
  head.fc_roll.bias[...] = jnp.arange(66.0)
  out2 = call(head, images())
  head.fc_roll.kernel[...], head.fc_roll.bias[...] = saved
  np.testing.assert_array_equal(out2["yaw"], np.tile(np.arange(66.0, dtype=np.float32), (2, 1)))
  np.testing.assert_array_equal(out2["roll"], out["roll"])


# ----------------------------------------------------------------------------- appearance and BatchNorm modes


def test_appearance_volume_and_batchnorm_train_vs_eval():
  net = AppearanceFeatureExtractor(image_channel=3, **GEN, rngs=nnx.Rngs(1))
  x = images(2)
  x_other = x.at[1].set(1.0 - x[1])
  norm = net.first.norm
  mean0 = np.asarray(norm.mean[...])

  f_train = call(net, x)
  assert f_train.shape == (2, DEPTH, SIZE // 4, SIZE // 4, CHANNELS)
  assert max_err(norm.mean[...], mean0) > 1e-4, "training updates the running mean"
  # Training: batch statistics, so sample 0's output depends on sample 1.
  assert max_err(call(net, x_other)[0], f_train[0]) > 1e-3

  net.eval()
  stats = np.asarray(norm.mean[...]), np.asarray(norm.var[...])
  f_eval = call(net, x)
  np.testing.assert_allclose(call(net, x_other)[0], f_eval[0], atol=1e-6)  # eval: per-sample
  np.testing.assert_array_equal(norm.mean[...], stats[0])
  np.testing.assert_array_equal(norm.var[...], stats[1])
  net.train()
  assert norm.use_running_average is False

  with pytest.raises(ValueError, match="reshape_channel"):
    AppearanceFeatureExtractor(**{**GEN, "max_features": 30}, rngs=nnx.Rngs(0))
  # face-vid2vid's SPADE generator (the Vox-256-New release) has a 3x3 `first`, its original one 7x7.
  assert net.first.conv.kernel.shape == (7, 7, 3, 8)
  spade_first = AppearanceFeatureExtractor(**GEN, first_kernel_size=3, rngs=nnx.Rngs(0))
  assert spade_first.first.conv.kernel.shape == (3, 3, 3, 8)


# ----------------------------------------------------------------------------- dense motion


def test_dense_motion_identity_for_identical_keypoints(nets):
  feature = jax.random.normal(jax.random.key(1), (2, DEPTH, 8, 8, CHANNELS))
  kp = jax.random.uniform(jax.random.key(2), (2, K, 3), minval=-0.8, maxval=0.8)
  out = call(nets["motion"], feature, kp, kp)
  assert out["mask"].shape == (2, DEPTH, 8, 8, K + 1)
  assert out["deformation"].shape == (2, DEPTH, 8, 8, 3)
  assert out["occlusion_map"].shape == (2, 8, 8, 1)
  np.testing.assert_allclose(out["mask"].sum(-1), 1.0, atol=1e-6)
  # Identical keypoints: every sparse motion is the identity, so the deformation is the identity grid, any mask.
  identity = blocks.make_coordinate_grid_3d((DEPTH, 8, 8))
  err = max_err(out["deformation"], jnp.broadcast_to(identity, out["deformation"].shape))
  assert err < 1e-6, f"identity deformation max abs err {err:.3e}"
  occ = np.asarray(out["occlusion_map"])
  assert occ.min() > 0 and occ.max() < 1


def test_dense_motion_inputs_match_torch_layout():
  """Sparse motions, deformed features and the hourglass input as face-vid2vid builds them (NCDHW torch)."""
  n, c, d, h, w = 2, 3, 3, 5, 6
  rng = np.random.default_rng(0)
  feat = rng.normal(size=(n, c, d, h, w)).astype(np.float32)
  kp_d, kp_s = (rng.uniform(-0.9, 0.9, size=(n, K, 3)).astype(np.float32) for _ in range(2))

  ft, kd, ks = torch.tensor(feat), torch.tensor(kp_d), torch.tensor(kp_s)
  xs, ys, zs = (2 * (torch.arange(m, dtype=torch.float32) / (m - 1)) - 1 for m in (w, h, d))
  grid = torch.stack([xs.view(1, 1, -1).expand(d, h, w), ys.view(1, -1, 1).expand(d, h, w),
                      zs.view(-1, 1, 1).expand(d, h, w)], -1)  # fmt: skip
  motion = grid[None, None] - kd.view(n, K, 1, 1, 1, 3) + ks.view(n, K, 1, 1, 1, 3)
  motions = torch.cat([grid[None, None].expand(n, 1, d, h, w, 3), motion], 1)  # (n, K+1, d, h, w, 3)
  rep = ft[:, None].expand(n, K + 1, c, d, h, w).reshape(n * (K + 1), c, d, h, w)
  deformed = F.grid_sample(rep, motions.reshape(n * (K + 1), d, h, w, 3), align_corners=False)
  deformed = deformed.view(n, K + 1, c, d, h, w)

  def gauss(kp):
    return torch.exp(-0.5 * ((grid[None, None] - kp.view(n, K, 1, 1, 1, 3)) ** 2).sum(-1) / 0.01)

  heat = torch.cat([torch.zeros(n, 1, d, h, w), gauss(kd) - gauss(ks)], 1)[:, :, None]
  inputs = torch.cat([heat, deformed], 2).view(n, -1, d, h, w)

  ours_motions, ours_inputs = dense_motion.hourglass_inputs(
    jnp.asarray(np.moveaxis(feat, 1, -1)), jnp.asarray(kp_d), jnp.asarray(kp_s)
  )
  errs = {
    "motions": max_err(ours_motions, motions.numpy()),
    "hourglass input": max_err(ours_inputs, np.moveaxis(inputs.numpy(), 1, -1)),
  }
  assert max(errs.values()) < 1e-5, f"max abs errs {errs}"


# ----------------------------------------------------------------------------- generator


def test_generator_scales_and_warp(nets):
  feature = jax.random.normal(jax.random.key(3), (2, DEPTH, 8, 8, CHANNELS))
  identity = jnp.broadcast_to(blocks.make_coordinate_grid_3d((DEPTH, 8, 8)), (2, DEPTH, 8, 8, 3))
  occlusion = jnp.full((2, 8, 8, 1), 0.7)
  out = call(nets["generator"], feature, identity, occlusion)
  shapes = [p.shape for p in out["predictions"]]
  assert shapes == [(2, 8, 8, 3), (2, 16, 16, 3), (2, 32, 32, 3)], shapes
  assert out["prediction"] is out["predictions"][-1] or np.array_equal(out["prediction"], out["predictions"][-1])
  for p in out["predictions"]:
    assert float(p.min()) > 0 and float(p.max()) < 1

  # Warping at grid_sample's pixel centres (align_corners=False) reproduces the volume exactly; face-vid2vid's
  # identity grid (ends at +-1) is torch's slightly shrunk resampling, as in the original.
  d, h, w = DEPTH, 8, 8
  centres = jnp.stack(
    jnp.broadcast_arrays(
      ((2 * jnp.arange(w) + 1) / w - 1)[None, None, :],
      ((2 * jnp.arange(h) + 1) / h - 1)[None, :, None],
      ((2 * jnp.arange(d) + 1) / d - 1)[:, None, None],
    ),
    -1,
  )
  centres = jnp.broadcast_to(centres, (2, d, h, w, 3))
  err = max_err(generator.deform_input(feature, centres), feature)
  assert err < 1e-6, f"pixel-centre warp max abs err {err:.3e}"
  ft = torch.tensor(np.moveaxis(np.asarray(feature), -1, 1))
  ref = F.grid_sample(ft, torch.tensor(np.asarray(identity)), align_corners=False)
  err = max_err(generator.deform_input(feature, identity), np.moveaxis(ref.numpy(), 1, -1))
  assert err < 1e-5, f"identity-grid warp vs torch max abs err {err:.3e}"
  # A deformation at another resolution is resized trilinearly first (face-vid2vid's deform_input).
  small = jax.random.uniform(jax.random.key(4), (2, 2, 4, 4, 3), minval=-1, maxval=1)
  up = F.interpolate(torch.tensor(np.asarray(small)).permute(0, 4, 1, 2, 3), size=(d, h, w), mode="trilinear")
  ref = F.grid_sample(ft, up.permute(0, 2, 3, 4, 1), align_corners=False)
  err = max_err(generator.deform_input(feature, small), np.moveaxis(ref.numpy(), 1, -1))
  assert err < 1e-5, f"resized-deformation warp vs torch max abs err {err:.3e}"


# ----------------------------------------------------------------------------- discriminator vs torch


class TorchDiscriminator(tnn.Module):
  """face-vid2vid's Discriminator layout (4x4 convs, InstanceNorm after the first, LeakyReLU 0.2, 2x2 pools but the
  last, spectral norm on every conv), written here in torch as the reference."""

  def __init__(self, widths):
    super().__init__()
    sn = tnn.utils.spectral_norm
    self.convs = tnn.ModuleList([sn(tnn.Conv2d(a, b, 4)) for a, b in zip(widths[:-1], widths[1:])])
    self.norms = tnn.ModuleList([tnn.InstanceNorm2d(b, affine=True) for b in widths[2:]])
    self.conv = sn(tnn.Conv2d(widths[-1], 1, 1))

  def forward(self, x):
    maps = []
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if i:
        x = self.norms[i - 1](x)
      x = F.leaky_relu(x, 0.2)
      if i != len(self.convs) - 1:
        x = F.avg_pool2d(x, 2)
      maps.append(x)
    return maps, self.conv(x)


def _load_sn(ours, conv_t):
  w = conv_t.weight_orig.detach().numpy()
  ours.kernel[...] = jnp.asarray(np.transpose(w, (2, 3, 1, 0)))
  ours.bias[...] = jnp.asarray(conv_t.bias.detach().numpy())
  ours.u[...] = jnp.asarray(conv_t.weight_u.numpy())
  ours.v[...] = jnp.asarray(conv_t.weight_v.numpy())


def test_discriminator_spectral_norm_matches_torch_in_train_and_eval():
  torch.manual_seed(0)
  widths = [3, 8, 16, 16]
  ref = TorchDiscriminator(widths)
  for norm in ref.norms:
    norm.weight.data = 1 + 0.3 * torch.randn(norm.num_features)
    norm.bias.data = 0.3 * torch.randn(norm.num_features)
  ours = MultiScaleDiscriminator(scales=(1, 0.5), block_expansion=4, num_blocks=3, max_features=16, sn=True,
                                 rngs=nnx.Rngs(0))  # fmt: skip
  assert set(ours.discs.keys()) == {"1", "0-5"}
  disc = ours.discs["1"]
  for i, block in enumerate(disc.down_blocks):
    _load_sn(block.conv, ref.convs[i])
    if i:
      block.norm.scale[...] = jnp.asarray(ref.norms[i - 1].weight.detach().numpy())
      block.norm.bias[...] = jnp.asarray(ref.norms[i - 1].bias.detach().numpy())
  _load_sn(disc.conv, ref.conv)

  x = torch.rand(2, 3, 64, 64)
  pyramid = {"prediction_1": jnp.asarray(np.moveaxis(x.numpy(), 1, -1)), "prediction_0.5": images(2, 32)}
  errs = {}
  for step in range(2):  # one power iteration per training call, u and v carried as state
    out = call(ours, pyramid)
    maps, pred = ref(x)
    errs[f"train {step} prediction"] = max_err(out["prediction_map_1"], np.moveaxis(pred.detach().numpy(), 1, -1))
    errs[f"train {step} features"] = max(
      max_err(a, np.moveaxis(b.detach().numpy(), 1, -1)) for a, b in zip(out["feature_maps_1"], maps)
    )
  errs["u"] = max_err(disc.down_blocks[1].conv.u[...], ref.convs[1].weight_u.numpy())
  errs["v"] = max_err(disc.down_blocks[1].conv.v[...], ref.convs[1].weight_v.numpy())
  ours.eval()
  ref.eval()
  u_before = np.asarray(disc.conv.u[...])
  out = call(ours, pyramid)
  errs["eval prediction"] = max_err(out["prediction_map_1"], np.moveaxis(ref(x)[1].detach().numpy(), 1, -1))
  assert max(errs.values()) < 1e-5, f"max abs errs {errs}"
  np.testing.assert_array_equal(disc.conv.u[...], u_before)
  assert out["prediction_map_1"].shape == (2, 10, 10, 1) and out["prediction_map_0.5"].shape == (2, 2, 2, 1)
  assert [f.shape[-1] for f in out["feature_maps_0.5"]] == [8, 16, 16]


# ----------------------------------------------------------------------------- everything under jit + grad


class Everything(nnx.Module):
  def __init__(self, nets, disc):
    self.kp, self.head, self.appearance = nets["kp"], nets["head"], nets["appearance"]
    self.motion, self.generator, self.disc = nets["motion"], nets["generator"], disc


def test_jit_and_grad_through_every_network(nets):
  model = Everything(nets, MultiScaleDiscriminator(scales=(1,), block_expansion=4, num_blocks=2, max_features=8,
                                                   sn=True, rngs=nnx.Rngs(5)))  # fmt: skip
  model.train()
  source, driver = images(2, seed=1), images(2, seed=2)

  def loss_fn(m):
    x_c = m.kp(source)
    head = m.head(driver)
    kp_source = x_c
    kp_driving = head["scale"][:, None, None] * x_c + 0.1 * head["translation"][:, None, :]
    kp_driving = kp_driving + 0.01 * jax.nn.softmax(head["yaw"])[:, :K, None]
    feature = m.appearance(source)
    motion = m.motion(feature, kp_driving, kp_source)
    out = m.generator(feature, motion["deformation"], motion["occlusion_map"])
    disc = m.disc({"prediction_1": out["prediction"]})
    return sum(jnp.mean(p) for p in out["predictions"]) + jnp.mean(disc["prediction_map_1"] ** 2)

  u_before = np.asarray(model.disc.discs["1"].down_blocks[1].conv.u[...])
  loss, grads = nnx.jit(lambda m: nnx.value_and_grad(loss_fn)(m))(model)
  assert np.isfinite(float(loss))
  u_after = model.disc.discs["1"].down_blocks[1].conv.u[...]
  assert max_err(u_after, u_before) > 0, "the power iteration's u is carried out of jit"
  for part in ("kp", "head", "appearance", "motion", "generator", "disc"):
    leaves = jax.tree.leaves(grads[part])
    norms = [float(jnp.linalg.norm(g)) for g in leaves]
    assert all(np.isfinite(norms)), part
    assert max(norms) > 0, f"no gradient reaches {part}"
  # s = 1 and no fc_scale gradient blocks: the head's scale path is differentiable too.
  assert float(jnp.abs(grads["head"]["fc_scale"]["kernel"][...]).max()) > 0
  assert isinstance(model.disc.discs["1"].conv, discriminator.SpectralNormConv2D)
