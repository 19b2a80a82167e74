"""FaceMesh's landmark network in JAX (mimajax.faces.facemesh_net): its graph and weights as read from the .tflite,
parity with LiteRT running the same file (random inputs and a real face), gradients to the image, and how far
`landmarks_2d` on a prepare-style crop lies from LiteRT's points on FaceMesh's own ROI."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimajax.faces import detection
from mimajax.faces import landmarks as face_landmarks
from mimajax.faces.facemesh_net import INPUT_SIZE, FaceMeshNet, _same_padding

# Ops of mediapipe 0.10.21's face_landmark.tflite after its 113 float16 DEQUANTIZE ops are folded into the params.
EXPECTED_OPS = {"CONV_2D": 25, "DEPTHWISE_CONV_2D": 20, "PRELU": 23, "ADD": 20, "MAX_POOL_2D": 6, "PAD": 3}


def test_same_padding_is_tflites():
  # TFLite's ComputePaddingHeightWidth: output ceil(in / stride), the odd padding pixel after.
  assert _same_padding(192, 3, 2) == (0, 1)  # the stem: 96 outputs, rows 0..192 read, one padded row at the end
  assert _same_padding(96, 3, 1) == (1, 1)
  assert _same_padding(3, 3, 3) == (0, 0)
  assert _same_padding(6, 4, 2, dilation=2) == (2, 3)  # extent 7, 3 outputs: (3 - 1) * 2 + 7 - 6 = 5 padded
  assert _same_padding(4, 2, 2) == (0, 0)


@pytest.fixture(scope="module")
def net():
  try:
    face_landmarks.check_available()  # the model file, and LiteRT for the reference
  except face_landmarks.LandmarkerUnavailable as e:
    pytest.skip(str(e))
  return FaceMeshNet.from_package()


@pytest.fixture(scope="module")
def litert(net):
  return face_landmarks._TFLiteModel("mesh", (468 * 3, 1), num_threads=1)


def test_graph_and_weights_are_the_files(net, litert):
  assert Counter(op.kind for op in net.graph.ops) == EXPECTED_OPS
  # Every weight against LiteRT's own read of the float16 constant, in the file's layout.
  details = {d["name"]: d for d in litert.interpreter.get_tensor_details()}
  for key, value in net.params.items():
    ref = litert.interpreter.get_tensor(details[key]["index"]).astype(np.float32)
    kind = next(op.kind for op in net.graph.ops if key in op.inputs)
    if key.endswith("/Kernel"):
      ref = ref.transpose(1, 2, 3, 0) if kind == "CONV_2D" else ref.transpose(1, 2, 0, 3)  # OHWI, 1HWC -> HWIO
    np.testing.assert_array_equal(np.asarray(value), ref, err_msg=key)
  assert net.params["conv2d_1/Kernel"].shape == (3, 3, 3, 16)  # the stem: 3x3, RGB -> 16
  assert net.params["depthwise_conv2d_1/Kernel"].shape == (3, 3, 1, 16)
  assert sum(v.size for v in net.params.values()) == 604685


@pytest.fixture(scope="module")
def astronaut():
  import skimage.data

  image = skimage.data.astronaut()
  points, found = face_landmarks.FaceLandmarker().track([image])
  assert found[0]
  return image, points[0, :468]


def test_parity_with_litert_gradients_and_the_prepare_crop(net, litert, astronaut):
  image, tracked = astronaut
  rng = np.random.default_rng(0)
  # FaceMesh's own ROI (1.5x the landmarks' box, eyes level): the crop LiteRT's next tracked frame would read.
  roi = face_landmarks.roi_from_points(tracked, *face_landmarks.ROLL_LANDMARKS, 1.5)
  roi_crop = face_landmarks.crop(image, roi, INPUT_SIZE).astype(np.float32) / 255.0
  inputs = np.concatenate([rng.uniform(size=(2, INPUT_SIZE, INPUT_SIZE, 3)).astype(np.float32), roi_crop[None]])
  # A prepare-style crop (Haar face box x 1.8, resized to 256), and a direction for a central difference.
  box = detection.image_face_box(image)
  face = detection.crop_and_resize(image, box, 256).astype(np.float32) / 255.0
  v = rng.normal(size=face.shape).astype(np.float32)
  v /= np.linalg.norm(v)
  eps = 0.5
  crops = np.stack([face, face + eps * v, face - eps * v])
  w = jnp.asarray(rng.normal(size=(468, 2)), jnp.float32)

  @jax.jit
  def run(net, inputs, crops):  # one compiled program: the forward, landmarks_2d and its gradient
    points, logits = net(inputs)
    loss = lambda c: (lambda uv: (jnp.sum(w * uv[0]), uv))(net.landmarks_2d(c))  # noqa: E731
    (_, uv), grad = jax.value_and_grad(loss, has_aux=True)(crops)
    return points, logits, uv, grad[0]

  points, logits, uv, grad = map(np.asarray, run(net, inputs, crops))

  ref = [litert(x) for x in inputs]
  ref_points = np.stack([r[0].reshape(468, 3) for r in ref])
  ref_logits = np.array([r[1].reshape(-1)[0] for r in ref])
  err_xy = np.abs(points[..., :2] - ref_points[..., :2]).max(axis=(1, 2))
  err_z = np.abs(points[..., 2] - ref_points[..., 2]).max(axis=1)
  err_logit = np.abs(logits - ref_logits)
  report = (f"max |JAX - LiteRT| (random, random, astronaut ROI): x,y {err_xy} px, z {err_z} px, logit {err_logit}"
            f" (logits {logits})")  # fmt: skip
  assert err_xy.max() < 2e-3 and err_z.max() < 2e-3 and err_logit.max() < 1e-3, report
  assert logits[2] > 5 > -5 > logits[:2].max(), report  # the face is present, noise is not

  # Gradients w.r.t. the crop, through the resize and the network: finite, non-zero, and the directional
  # derivative along v agrees with a central difference.
  directional = float(np.sum(grad * v))
  w = np.asarray(w)
  central = float(np.sum(w * uv[1]) - np.sum(w * uv[2])) / (2 * eps)
  message = f"grad.v {directional:.5g}, central difference {central:.5g}, |grad| {np.linalg.norm(grad):.4g}; {report}"
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0, message
  assert abs(directional - central) < 0.05 * abs(central) + 1e-4, message

  # landmarks_2d on the prepare-style crop vs LiteRT's tracked points on the proper ROI, in image pixels.
  x0, y0, side = box
  on_image = np.array([x0, y0]) + (uv[0] + 1) / 2 * side
  dist = np.linalg.norm(on_image - tracked[:, :2], axis=1)
  eyes = np.linalg.norm(tracked[33, :2] - tracked[263, :2])
  figures = (f"prepare crop (side {side} px) vs FaceMesh ROI: mean {dist.mean():.2f} px, max {dist.max():.2f} px;"
             f" {dist.mean() / side:.2%} / {dist.max() / side:.2%} of the crop, {dist.mean() / eyes:.1%} /"
             f" {dist.max() / eyes:.1%} of the eye distance; {message}")  # fmt: skip
  print(figures)
  assert dist.mean() < 0.05 * side, figures  # the same face, not a check of accuracy
