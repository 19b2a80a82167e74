"""MediaPipe FaceMesh's landmark network (face_landmark.tflite) in JAX: 468 landmarks with gradients to the image.

MMFA's 2-D landmark loss (paper eq. 9) compares the landmarks of the generated image with those of the driving image,
so the landmark network must be differentiable w.r.t. its input. mimajax.faces.landmarks runs the same .tflite with
LiteRT (numpy in, numpy out, no gradients); this module reads that file's graph and weights and runs them as JAX ops.

The file is read with the TFLite flatbuffer schema that ai-edge-litert ships (`ai_edge_litert.schema_py_generated`,
on the `flatbuffers` package; tensorflow's copy as a fallback): no interpreter, no TensorFlow. What the file holds
(mediapipe 0.10.21), one subgraph, ops in execution order:

  DEQUANTIZE         113  float16 weights -> float32: folded here at load (an exact cast), so the params are fp32
  CONV_2D             25  OHWI kernels (stored HWIO here); 3x3 stride 2 stem, 1x1 pointwise, 3x3 stride-3 heads
  DEPTHWISE_CONV_2D   20  1HW(C*M) kernels (stored HW1(C*M), feature groups = C); 3x3, stride 1 or 2
  PRELU               23  per-channel slopes (1, 1, C)
  ADD                 20  residual sums
  MAX_POOL_2D          6  2x2 stride 2: the downsampling shortcuts
  PAD                  3  zero channel padding of a shortcut where the width grows

A BlazeFace-style residual MobileNet: 192 px -> 3 px, then two heads, a 3x3 stride-3 VALID convolution each, to
1404 = 468 x 3 landmark values and one face-presence logit. RESHAPE is also supported, and any other op, fused
activation or quantisation raises, naming it, rather than being guessed.

TFLite semantics kept exactly: NHWC; SAME padding puts the odd pixel after (before = total // 2, TFLite's
ComputePaddingHeightWidth, the same as XLA's "SAME"); VALID none; PRELU is x if x >= 0 else alpha * x.

Outputs: points (N, 468, 3) in continuous pixel coordinates of the 192-px input (x right, y down, how landmarks.py
maps them back to the image; z in the same pixel scale, larger is farther) and the presence logit (N,)
(sigmoid > 0.5 = a face, landmarks.PRESENCE_THRESHOLD).

`FaceMeshNet` is a pytree (the params are its leaves, the graph static), so it can travel as a Task's frozen
argument (mimajax.families) and be called inside the jitted loss; its weights are frozen (stop_gradient).

`landmarks_2d` is the loss's entry point: any face crop (N, H, W, 3) in [0, 1], resized to 192 (bilinear, antialiased
when shrinking: jax.image.resize, differentiable), -> (N, 468, 2) in the crop's own [-1, 1] coordinates. It assumes a
face-centred square crop like `mimajax prepare`'s (mimajax.faces.detection, face side x FACE_MARGIN 1.8), not
FaceMesh's own ROI (1.5x the landmarks' box, rotated so the eyes are level, landmarks.roi_from_points): the face is
smaller in the input than the network was trained for and not roll-corrected. On the astronaut portrait
(skimage.data.astronaut, tests/test_facemesh_net.py) the points from such a crop (Haar box x 1.8, 173 px, resized to
256) lie a mean 0.70 px (max 2.2 px) from LiteRT's points on the proper ROI: 0.4 % (1.3 %) of the crop's side, 1.1 %
(3.4 %) of the eye-corner distance (one portrait; how much of such an offset two crops framed alike, eq. 9's
generated and driving images, share is not measured).

Parity with LiteRT (XNNPACK, fp32) on the same 192-px inputs, CPU: max 1.2e-4 px in x, y (4e-5 in z) and 8e-6 in the
presence logit, on uniform noise and on the astronaut's FaceMesh ROI.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mimajax.faces import landmarks as litert_landmarks

INPUT_SIZE = 192
NUM_POINTS = 468
SUPPORTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "PRELU", "ADD", "MAX_POOL_2D", "PAD", "RESHAPE", "DEQUANTIZE")


def _schema():
  """The TFLite flatbuffer schema module (flatc's Python output), from ai-edge-litert or tensorflow."""
  try:
    from ai_edge_litert import schema_py_generated as schema
  except ImportError:
    try:
      from tensorflow.lite.python import schema_py_generated as schema
    except ImportError:
      raise litert_landmarks.LandmarkerUnavailable(
        f"reading a .tflite file needs its schema: {litert_landmarks.INSTALL_COMMAND}"
      ) from None
  return schema


@dataclasses.dataclass(frozen=True)
class Op:
  """One TFLite operator: inputs and output name tensors (activations, or keys of the params)."""

  kind: str
  inputs: tuple[str, ...]
  output: str
  options: tuple[tuple[str, Any], ...] = ()  # (name, value) pairs: hashable, so the graph can be jit-static

  def get(self, name: str) -> Any:
    return dict(self.options)[name]


@dataclasses.dataclass(frozen=True)
class Graph:
  """The op sequence of the file's subgraph, without its weights (they are the params pytree)."""

  ops: tuple[Op, ...]
  input: str
  landmarks: str  # the output with 468 x 3 values
  presence: str  # the output with one value


# --------------------------------------------------------------------------- reading the file


def _enum_names(enum) -> dict[int, str]:
  return {v: k for k, v in vars(enum).items() if not k.startswith("_")}


def _constant(model, tensor, file_bytes: bytes, schema) -> np.ndarray | None:
  """A tensor's constant value from its buffer (inline data, or offset/size past the flatbuffer), or None."""
  buf = model.buffers[tensor.buffer] if tensor.buffer > 0 else None
  if buf is None:
    return None
  if buf.data is not None and len(buf.data):
    raw = np.asarray(buf.data, np.uint8).tobytes()
  elif buf.offset > 1:
    raw = file_bytes[buf.offset : buf.offset + buf.size]
  else:
    return None
  dtypes = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16,
            schema.TensorType.INT32: np.int32, schema.TensorType.INT64: np.int64}  # fmt: skip
  if tensor.type not in dtypes:
    raise NotImplementedError(f"constant {tensor.name!r} has TFLite type {tensor.type}, not a float or int32/64")
  return np.frombuffer(raw, dtypes[tensor.type]).reshape([int(d) for d in tensor.shape])


def read_tflite(path: str | os.PathLike) -> tuple[Graph, dict[str, np.ndarray]]:
  """(graph, params) of a float TFLite model: params fp32 by constant name, kernels in JAX's HWIO layout."""
  schema = _schema()
  file_bytes = Path(path).read_bytes()
  model = schema.ModelT.InitFromPackedBuf(file_bytes, 0)
  if len(model.subgraphs) != 1:
    raise NotImplementedError(f"{path}: {len(model.subgraphs)} subgraphs, expected one")
  sub = model.subgraphs[0]
  op_names = _enum_names(schema.BuiltinOperator)
  act_names = _enum_names(schema.ActivationFunctionType)
  names = [t.name.decode() for t in sub.tensors]
  names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]  # unique keys

  constants = {i: c for i, t in enumerate(sub.tensors) if (c := _constant(model, t, file_bytes, schema)) is not None}
  folded: dict[int, int] = {}  # a DEQUANTIZE output -> the constant it casts
  params: dict[str, np.ndarray] = {}
  layouts: dict[str, str] = {}
  ops = []

  def param(index: int, layout: str = "as is") -> str:
    """The params key of a constant input, converted once to the layout its op wants."""
    index = folded.get(index, index)
    key = names[index]
    if key in layouts and layouts[key] != layout:
      raise NotImplementedError(f"constant {key!r} used both as {layouts[key]} and {layout}")
    if key not in params:
      value = constants[index].astype(np.float32)
      if layout == "OHWI->HWIO":
        value = value.transpose(1, 2, 3, 0)
      elif layout == "1HWC->HW1C":
        value = value.transpose(1, 2, 0, 3)
      params[key], layouts[key] = np.ascontiguousarray(value), layout
    return key

  def is_constant(index: int) -> bool:
    return folded.get(index, index) in constants

  for op in sub.operators:
    code = model.operatorCodes[op.opcodeIndex]
    kind = op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), str(code.builtinCode))
    if kind not in SUPPORTED_OPS:
      raise NotImplementedError(f"{path}: TFLite op {kind} is not ported (supported: {', '.join(SUPPORTED_OPS)})")
    ins = [int(i) for i in op.inputs if i >= 0]
    (out,) = [int(o) for o in op.outputs]
    opts = op.builtinOptions
    activation = act_names.get(getattr(opts, "fusedActivationFunction", 0) or 0)
    if activation != "NONE":
      raise NotImplementedError(f"{path}: {kind} with fused activation {activation} is not ported")

    if kind == "DEQUANTIZE":
      (src,) = ins
      if src not in constants or sub.tensors[src].type != schema.TensorType.FLOAT16:
        raise NotImplementedError(f"{path}: DEQUANTIZE of {names[src]!r} is not a float16 constant")
      folded[out] = src
      continue
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
      x, kernel, *bias = ins
      layout = "OHWI->HWIO" if kind == "CONV_2D" else "1HWC->HW1C"
      inputs = (names[x], param(kernel, layout), *(param(b) for b in bias))
      options = (("stride", (opts.strideH, opts.strideW)), ("dilation", (opts.dilationHFactor, opts.dilationWFactor)),
                 ("same", opts.padding == schema.Padding.SAME))  # fmt: skip
    elif kind == "PRELU":
      x, alpha = ins
      inputs, options = (names[x], param(alpha)), ()
    elif kind == "ADD":
      inputs, options = tuple(param(i) if is_constant(i) else names[i] for i in ins), ()
    elif kind == "MAX_POOL_2D":
      (x,) = ins
      inputs = (names[x],)
      options = (("window", (opts.filterHeight, opts.filterWidth)), ("stride", (opts.strideH, opts.strideW)),
                 ("same", opts.padding == schema.Padding.SAME))  # fmt: skip
    elif kind == "PAD":
      x, pads = ins
      inputs, options = (names[x],), (("pads", tuple(map(tuple, constants[pads].tolist()))),)
    else:  # RESHAPE: to the output tensor's shape, the batch axis left free
      inputs, options = (names[ins[0]],), (("shape", tuple(int(d) for d in sub.tensors[out].shape[1:])),)
    ops.append(Op(kind, inputs, names[out], options))

  (inp,) = [int(i) for i in sub.inputs]
  by_size = {int(np.prod(sub.tensors[o].shape)): names[o] for o in sub.outputs}
  if set(by_size) != {NUM_POINTS * 3, 1}:
    raise NotImplementedError(f"{path}: outputs of sizes {sorted(by_size)}, expected {NUM_POINTS * 3} and 1")
  graph = Graph(tuple(ops), names[inp], by_size[NUM_POINTS * 3], by_size[1])
  return graph, params


# --------------------------------------------------------------------------- the forward pass


def _same_padding(size: int, window: int, stride: int, dilation: int = 1) -> tuple[int, int]:
  """TFLite's SAME: output ceil(size / stride), the total padding split with the odd pixel after."""
  extent = (window - 1) * dilation + 1
  total = max((math.ceil(size / stride) - 1) * stride + extent - size, 0)
  return total // 2, total - total // 2


def _conv(op: Op, x: jax.Array, kernel: jax.Array, bias: jax.Array | None, precision) -> jax.Array:
  (kh, kw, _, _), (sh, sw), (dh, dw) = kernel.shape, op.get("stride"), op.get("dilation")
  if op.get("same"):
    padding = [_same_padding(x.shape[1], kh, sh, dh), _same_padding(x.shape[2], kw, sw, dw)]
  else:
    padding = [(0, 0), (0, 0)]
  y = jax.lax.conv_general_dilated(
    x, kernel, (sh, sw), padding, rhs_dilation=(dh, dw), dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1] if op.kind == "DEPTHWISE_CONV_2D" else 1, precision=precision,
  )  # fmt: skip
  return y if bias is None else y + bias


def _max_pool(op: Op, x: jax.Array) -> jax.Array:
  (wh, ww), (sh, sw) = op.get("window"), op.get("stride")
  if op.get("same"):  # padded cells never win: TFLite's max pool ignores them, as -inf does
    padding = [(0, 0), _same_padding(x.shape[1], wh, sh), _same_padding(x.shape[2], ww, sw), (0, 0)]
  else:
    padding = [(0, 0)] * 4
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, wh, ww, 1), (1, sh, sw, 1), padding)


def facemesh_forward(
  graph: Graph, params: dict[str, jax.Array], images: jax.Array, precision=None
) -> tuple[jax.Array, jax.Array]:
  """images (N, 192, 192, 3) in [0, 1] -> points (N, 468, 3) in input pixels, presence logit (N,).

  precision: None (XLA's default: TF32 convolutions on recent GPUs) or jax.lax.Precision.HIGHEST (fp32 parity).
  """
  if images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
    raise ValueError(f"FaceMesh takes (N, {INPUT_SIZE}, {INPUT_SIZE}, 3) images, got {images.shape}")
  params = jax.lax.stop_gradient(params)  # frozen: eq. 9 trains the generator, not the landmark network
  values: dict[str, jax.Array] = {graph.input: jnp.asarray(images, jnp.float32)}
  value = lambda name: params[name] if name in params else values[name]  # noqa: E731
  for op in graph.ops:
    args = [value(name) for name in op.inputs]
    if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
      y = _conv(op, args[0], args[1], args[2] if len(args) > 2 else None, precision)
    elif op.kind == "PRELU":
      y = jnp.where(args[0] >= 0, args[0], args[1] * args[0])
    elif op.kind == "ADD":
      y = args[0] + args[1]
    elif op.kind == "MAX_POOL_2D":
      y = _max_pool(op, args[0])
    elif op.kind == "PAD":
      y = jnp.pad(args[0], op.get("pads"))
    elif op.kind == "RESHAPE":
      y = args[0].reshape(args[0].shape[0], *op.get("shape"))
    else:
      raise NotImplementedError(op.kind)
    values[op.output] = y
  n = images.shape[0]
  return values[graph.landmarks].reshape(n, NUM_POINTS, 3), values[graph.presence].reshape(n)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FaceMeshNet:
  """FaceMesh's landmark network: `net(images)` -> (points (N, 468, 3) in 192-px input pixels, logit (N,))."""

  params: dict[str, jax.Array]
  graph: Graph = dataclasses.field(metadata=dict(static=True))
  precision: Any = dataclasses.field(default=None, metadata=dict(static=True))

  @classmethod
  def from_file(cls, path: str | os.PathLike, precision=None) -> FaceMeshNet:
    graph, params = read_tflite(path)
    return cls({k: jnp.asarray(v) for k, v in params.items()}, graph, precision)

  @classmethod
  def from_package(cls, precision=None) -> FaceMeshNet:
    """The face_landmark.tflite bundled in the mediapipe 0.10.21 wheel (LandmarkerUnavailable if not installed)."""
    return cls.from_file(litert_landmarks.model_path("mesh"), precision)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return facemesh_forward(self.graph, self.params, images, self.precision)

  def landmarks_2d(self, images: jax.Array) -> jax.Array:
    """Face crops (N, H, W, 3) in [0, 1] -> (N, 468, 2) in the crop's [-1, 1] coordinates (x right, y down).

    The crop is taken as it is, resized to 192: a face-centred crop like `mimajax prepare`'s (margin 1.8), not
    FaceMesh's eye-levelled 1.5x ROI (see the module docstring for how far that moves the points).
    """
    n, h, w, c = images.shape
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
      images = jax.image.resize(images, (n, INPUT_SIZE, INPUT_SIZE, c), "bilinear")
    points, _ = self(images)
    return points[..., :2] * (2.0 / INPUT_SIZE) - 1.0


def load_facemesh(precision=None) -> FaceMeshNet:
  """`FaceMeshNet.from_package()`."""
  return FaceMeshNet.from_package(precision)
