"""MMFA's keypoint equation (eq. 5), rotation conventions (face-vid2vid degrees, the dataset's Deep3DFaceRecon angles),
bins -> degrees and relative motion, against explicit numpy / torch transcriptions."""

import jax
import jax.numpy as jnp
import numpy as np

from mimajax.face3d.camera import Camera
from mimajax.mmfa import keypoints as kp


def _rng(seed=0):
  return np.random.default_rng(seed)


def _random_rotations(rng, n):
  q, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
  return q * np.sign(np.linalg.det(q))[:, None, None]


def test_transform_keypoints_matches_explicit_loops():
  rng = _rng(0)
  n, k = 2, 5
  x_c = rng.normal(size=(n, k, 3)).astype(np.float32)
  rot = _random_rotations(rng, n).astype(np.float32)
  delta = rng.normal(size=(n, k, 3)).astype(np.float32) * 0.1
  scale = rng.uniform(0.5, 1.5, size=(n,)).astype(np.float32)
  t = rng.normal(size=(n, 3)).astype(np.float32)
  want = np.zeros((n, k, 3))
  for b in range(n):
    for i in range(k):
      want[b, i] = scale[b] * (rot[b] @ x_c[b, i] + delta[b, i]) + t[b]
  got = kp.transform_keypoints(x_c, rot, delta, scale, t)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  motion = kp.Motion(jnp.asarray(rot), jnp.asarray(delta), jnp.asarray(scale), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(kp.keypoints_from_motion(x_c, motion)), want, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(kp.project_to_2d(got)), np.asarray(got)[..., :2])


def _torch_get_rotation_matrix(yaw, pitch, roll):
  """face-vid2vid's modules/model.py get_rotation_matrix, transcribed in torch."""
  import torch

  yaw, pitch, roll = (torch.tensor(a, dtype=torch.float32)[:, None] / 180 * 3.14 for a in (yaw, pitch, roll))
  o, z = torch.ones_like(pitch), torch.zeros_like(pitch)
  pm = torch.cat([o, z, z, z, torch.cos(pitch), -torch.sin(pitch), z, torch.sin(pitch), torch.cos(pitch)], 1)
  ym = torch.cat([torch.cos(yaw), z, torch.sin(yaw), z, o, z, -torch.sin(yaw), z, torch.cos(yaw)], 1)
  rm = torch.cat([torch.cos(roll), -torch.sin(roll), z, torch.sin(roll), torch.cos(roll), z, z, z, o], 1)
  return torch.einsum("bij,bjk,bkm->bim", pm.view(-1, 3, 3), ym.view(-1, 3, 3), rm.view(-1, 3, 3)).numpy()


def test_rotation_from_degrees_is_face_vid2vids():
  rng = _rng(1)
  yaw, pitch, roll = (rng.uniform(-90, 90, size=4).astype(np.float32) for _ in range(3))
  got = np.asarray(kp.rotation_from_degrees(yaw, pitch, roll))
  np.testing.assert_allclose(got, _torch_get_rotation_matrix(yaw, pitch, roll), atol=1e-6)
  np.testing.assert_allclose(got @ np.swapaxes(got, 1, 2), np.broadcast_to(np.eye(3), got.shape), atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(got), 1.0, atol=1e-5)
  # a pure yaw of 90 degrees (with exact pi) turns the +x axis to -z: about the image's vertical axis
  r = np.asarray(kp.rotation_from_degrees(np.array([90.0]), np.array([0.0]), np.array([0.0]), pi=np.pi))[0]
  np.testing.assert_allclose(r @ np.array([1.0, 0, 0]), [0, 0, -1], atol=1e-6)


def test_headpose_from_bins():
  uniform = np.zeros((1, 66), np.float32)
  np.testing.assert_allclose(np.asarray(kp.headpose_from_bins(uniform)), [32.5 * 3 - 99], atol=1e-4)
  peaked = np.full((2, 66), -1e4, np.float32)
  peaked[0, 33], peaked[1, 0] = 0.0, 0.0
  np.testing.assert_allclose(np.asarray(kp.headpose_from_bins(peaked)), [0.0, -99.0], atol=1e-4)
  logits = _rng(2).normal(size=(3, 66)).astype(np.float32)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(kp.headpose_from_bins(logits)), (p * np.arange(66)).sum(1) * 3 - 99, atol=1e-4)


def _world_rotation(angles):
  """R_w = Rz(z) Ry(y) Rx(x) (column vectors), Deep3DFaceRecon's / motion_fit's convention, in numpy."""
  out = []
  for x, y, z in angles:
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    out.append(rz @ ry @ rx)
  return np.stack(out)


def test_rotation_from_deep3d_gives_the_same_image_positions():
  rng = _rng(3)
  angles = rng.uniform(-0.6, 0.6, size=(3, 3)).astype(np.float32)
  points_w = rng.normal(size=(20, 3)) * 0.3  # a point set around the origin (assumption 1)
  r_w = _world_rotation(angles)
  r_k = np.asarray(kp.rotation_from_deep3d(angles))
  f = np.diag(kp.WORLD_TO_KEYPOINT)
  np.testing.assert_allclose(r_k, f @ r_w @ f, atol=1e-6)
  np.testing.assert_allclose(np.linalg.det(r_k), 1.0, atol=1e-5)
  # closed form: Rz(-z) Ry(-y) Rx(x)
  np.testing.assert_allclose(r_k, _world_rotation(angles * np.array([1, -1, -1])), atol=1e-6)

  rotated_w = np.einsum("nij,pj->npi", r_w, points_w)
  rotated_k = np.einsum("nij,pj->npi", r_k, points_w * np.array(kp.WORLD_TO_KEYPOINT))
  image_k = np.asarray(kp.project_to_2d(jnp.asarray(rotated_k, jnp.float32)))
  # orthographic image of the world: column grows with x, row with -y (image rows grow downward)
  np.testing.assert_allclose(image_k, np.stack([rotated_w[..., 0], -rotated_w[..., 1]], -1), atol=1e-5)
  # the dataset's camera, pushed far away so its perspective is nearly orthographic: (column, row) relative to the
  # image centre is the keypoint frame's (x, y), and its depth grows with the keypoint frame's z
  cam = Camera(focal=1e4, cx=0.0, cy=0.0, height=0, width=0, distance=1e4)
  screen = np.asarray(cam.project(jnp.asarray(rotated_w, jnp.float32)))
  np.testing.assert_allclose(screen[..., :2], image_k, atol=2e-3)
  np.testing.assert_allclose(screen[..., 2] - 1e4, rotated_k[..., 2], atol=2e-3)


def test_relative_motion():
  n, k = 2, 4

  def motion(seed):
    r = np.random.default_rng(seed)
    return kp.Motion(
      jnp.asarray(_random_rotations(r, n), jnp.float32),
      jnp.asarray(r.normal(size=(n, k, 3)), jnp.float32),
      jnp.asarray(r.uniform(0.5, 2, size=n), jnp.float32),
      jnp.asarray(r.normal(size=(n, 3)), jnp.float32),
    )

  s, d, d0 = motion(10), motion(11), motion(12)
  same = kp.relative_motion(s, d0, d0)  # the driver's first frame reproduces the source
  for a, b in zip(same, s):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  out = kp.relative_motion(s, d, d0)
  rs, rd, rd0 = (np.asarray(m.rotation, np.float64) for m in (s, d, d0))
  np.testing.assert_allclose(np.asarray(out.rotation), rd @ np.linalg.inv(rd0) @ rs, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.delta), np.asarray(s.delta + d.delta - d0.delta), atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.scale), np.asarray(s.scale * d.scale / d0.scale), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.translation), np.asarray(s.translation + d.translation - d0.translation),
                             atol=1e-6)  # fmt: skip


def test_jit_and_grad():
  rng = _rng(5)
  x_c = jnp.asarray(rng.normal(size=(2, 3, 3)), jnp.float32)
  logits = jnp.asarray(rng.normal(size=(2, 3, 66)), jnp.float32)

  def f(logits, x_c):
    degrees = [kp.headpose_from_bins(logits[:, i]) for i in range(3)]
    rot = kp.rotation_from_degrees(*degrees)
    x = kp.transform_keypoints(x_c, rot, jnp.zeros_like(x_c), jnp.ones((2,)), jnp.zeros((2, 3)))
    return jnp.sum(kp.project_to_2d(x) ** 2)

  value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(logits, x_c)
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).sum() > 0 for g in grads)


# ----------------------------------------------------------------------------------------- eq. 4: expression


def _torch_expression(image_channel, block_expansion, num_blocks, exp_dim, num_kp, hidden, flatten_side=None):
  """Our reading of appendix A.1 in torch (face-vid2vid's ResBottleneck transcribed), with our attribute names."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  class ResBottleneck(nn.Module):  # face-vid2vid modules/util.py
    def __init__(self, c, stride):
      super().__init__()
      self.conv1, self.conv2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c // 4, 3, padding=1, stride=stride)
      self.conv3 = nn.Conv2d(c // 4, c, 1)
      self.norm1, self.norm2, self.norm3 = nn.BatchNorm2d(c // 4), nn.BatchNorm2d(c // 4), nn.BatchNorm2d(c)
      self.skip, self.norm4 = nn.Conv2d(c, c, 1, stride=stride), nn.BatchNorm2d(c)

    def forward(self, x):
      out = F.relu(self.norm1(self.conv1(x)))
      out = F.relu(self.norm2(self.conv2(out)))
      return F.relu(self.norm3(self.conv3(out)) + self.norm4(self.skip(x)))

  class Encoder(nn.Module):
    def __init__(self):
      super().__init__()
      widths = [block_expansion * 2 ** (i + 2) for i in range(num_blocks)]
      self.conv1 = nn.Conv2d(image_channel, block_expansion, 7, stride=2, padding=3)
      self.channel_convs = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip([block_expansion] + widths, widths))
      self.channel_norms = nn.ModuleList(nn.BatchNorm2d(w) for w in widths)
      self.blocks = nn.ModuleList(ResBottleneck(w, 2) for w in widths)
      self.fc = nn.Linear(widths[-1] * (flatten_side or 1) ** 2, exp_dim)

    def forward(self, x):
      x = F.max_pool2d(F.relu(self.conv1(x)), 3, 2, 1)
      for conv, norm, block in zip(self.channel_convs, self.channel_norms, self.blocks):
        x = block(F.relu(norm(conv(x))))
      x = x.view(x.shape[0], -1) if flatten_side else x.mean((2, 3))
      return self.fc(x)

  class Decoder(nn.Module):
    def __init__(self):
      super().__init__()
      sizes = [exp_dim + 3 * num_kp, *hidden]
      self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
      self.norms = nn.ModuleList(nn.BatchNorm1d(b) for b in sizes[1:])
      self.out = nn.Linear(sizes[-1], 3 * num_kp)

    def forward(self, f, x_c):
      x = torch.cat([f, x_c.reshape(x_c.shape[0], -1)], -1)
      for layer, norm in zip(self.layers, self.norms):
        x = F.relu(norm(layer(x)))
      return self.out(x).view(-1, num_kp, 3)

  return Encoder(), Decoder()


def _load_from_torch(module, reference):
  """A torch module's state into the nnx module with the same attribute names (lists as indices)."""
  from mimajax.mmfa import blocks

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
    elif leaf == "weight":  # (out, in, *k) -> (*k, in, out)
      name, v = "kernel", np.transpose(v, (*range(2, v.ndim), 1, 0))
    else:
      name = leaf
    variable = getattr(target, name)
    assert variable[...].shape == v.shape, key
    variable[...] = jnp.asarray(v)


def _randomise_bn_(module, seed):
  import torch

  g = torch.Generator().manual_seed(seed)
  for m in module.modules():
    if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
      n = m.num_features
      m.weight.data = 1 + 0.3 * torch.randn(n, generator=g)
      m.bias.data = 0.3 * torch.randn(n, generator=g)
      m.running_mean.data = 0.2 * torch.randn(n, generator=g)
      m.running_var.data = 1 + 0.5 * torch.rand(n, generator=g)
  return module


def test_expression_encoder_decoder_match_torch_in_train_and_eval():
  import torch
  from flax import nnx

  from conftest import nchw
  from mimajax.mmfa.expression import ExpressionDecoder, ExpressionEncoder

  torch.manual_seed(0)
  sizes = dict(image_channel=3, block_expansion=8, num_blocks=2, exp_dim=6)
  k, hidden = 4, (16, 12)
  for flatten_side in (None, 2):
    t_enc, t_dec = (_randomise_bn_(m, 1) for m in _torch_expression(**sizes, num_kp=k, hidden=hidden,
                                                                    flatten_side=flatten_side))  # fmt: skip
    enc = ExpressionEncoder(**sizes, image_size=32 if flatten_side else None, rngs=nnx.Rngs(0))
    dec = ExpressionDecoder(exp_dim=6, num_kp=k, hidden=hidden, rngs=nnx.Rngs(1))
    assert float(jnp.abs(dec(jnp.ones((2, 6)), jnp.ones((2, k, 3)))).max()) == 0.0  # zero-initialised: delta = 0
    _load_from_torch(enc, t_enc)
    torch.nn.init.normal_(t_dec.out.weight, std=0.3)  # a non-zero last layer, to compare it
    _load_from_torch(dec, t_dec)
    rng = np.random.default_rng(10)
    image = rng.uniform(size=(3, 32, 32, 3)).astype(np.float32)
    x_c = rng.uniform(-1, 1, size=(3, k, 3)).astype(np.float32)
    for mode in ("train", "eval") if flatten_side is None else ("train",):  # the flattening is mode-independent
      for m in (t_enc, t_dec, enc, dec):
        getattr(m, mode)()
      with torch.no_grad():
        f_ref = t_enc(torch.from_numpy(nchw(image)))
        d_ref = t_dec(f_ref, torch.from_numpy(x_c))
      f = enc(image)
      d = dec(f, x_c)
      assert f.shape == (3, 6) and d.shape == (3, k, 3)
      np.testing.assert_allclose(np.asarray(f), f_ref.numpy(), atol=2e-4, err_msg=mode)
      np.testing.assert_allclose(np.asarray(d), d_ref.numpy(), atol=2e-4, err_msg=mode)
    # the training pass updated the running statistics as torch's did
    np.testing.assert_allclose(np.asarray(enc.channel_norms[0].var[...]), t_enc.channel_norms[0].running_var.numpy(),
                               atol=1e-5)  # fmt: skip

  # jit + grad, in training mode
  enc.train()
  dec.train()
  dec.out.kernel[...] = jnp.zeros_like(dec.out.kernel[...])  # back to the zero start

  @nnx.jit
  def step(enc, dec):
    def loss(enc, dec):
      f = enc(image)
      # linear in delta: a squared loss would have no gradient at the zero-initialised delta
      return jnp.sum(dec(f, x_c) * jnp.arange(3.0 * k).reshape(k, 3)) + jnp.sum(f**2)

    return nnx.value_and_grad(loss, argnums=(0, 1))(enc, dec)

  value, (g_enc, g_dec) = step(enc, dec)
  assert np.isfinite(float(value))
  assert float(jnp.abs(g_dec.out.kernel[...]).sum()) > 0  # the zero last layer still learns
  assert float(jnp.abs(g_enc.conv1.kernel[...]).sum()) > 0
