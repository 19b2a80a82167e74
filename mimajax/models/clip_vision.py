"""CLIP ViT image encoder (Radford et al. 2021): MIMAFace's appearance features e_tex and e_id (paper sec. 3.2, MIA).

The same network as transformers' `CLIPVisionModel` / `CLIPVisionModelWithProjection` (ViT-L/14 in
MIMAFace), channels-last: patch tokens plus a class token, pre-LN transformer, the class token
LayerNorm-ed as the pooled output. MIA reads the patch tokens of the last layer as e_tex and the
pooled class token as e_id; the release variant reads all 257 hidden states. Module names follow
transformers' so `mimajax/convert/clip_format.py` maps keys with a few explicit renames.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mimajax.models.attention import Attention
from mimajax.models.layers import LayerNorm, linear

Dtype = Any

# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (RGB), applied to images in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The activations CLIP checkpoints name (`hidden_act`), as transformers' ACT2FN defines them.
ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # e.g. LAION OpenCLIP conversions
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Architecture of transformers' `CLIPVisionConfig` (field names and defaults as there)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"CLIP hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"CLIP hidden_act {self.hidden_act!r} not supported; expected one of {sorted(ACTIVATIONS)}")
    if self.image_size < self.patch_size:
      raise ValueError(f"CLIP image_size={self.image_size} is smaller than patch_size={self.patch_size}")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    """Class token + patches: the length of the position table and of every hidden state."""
    return self.grid_size**2 + 1

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
    """From a `CLIPVisionConfig` dict, or a full `CLIPConfig` dict (its vision_config + projection_dim)."""
    config = dict(config)
    if "vision_config" in config:
      vision = dict(config["vision_config"] or {})
      # CLIPModel's visual_projection is sized by the top-level projection_dim, not vision_config's.
      if "projection_dim" in config:
        vision["projection_dim"] = config["projection_dim"]
      config = vision
    elif config.get("model_type", "clip_vision_model") != "clip_vision_model":
      raise ValueError(
        f"config model_type {config['model_type']!r} is not a CLIP vision model; "
        "expected 'clip_vision_model' or a 'clip' config with a vision_config"
      )
    if config.get("attention_dropout", 0.0):
      raise ValueError(f"CLIP attention_dropout={config['attention_dropout']} is not supported; expected 0.0")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})

  def to_transformers(self, with_projection: bool = True) -> dict[str, Any]:
    """config.json of `CLIPVisionModelWithProjection` (or `CLIPVisionModel` without projection)."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out["attention_dropout"] = 0.0
    out["model_type"] = "clip_vision_model"
    out["architectures"] = ["CLIPVisionModelWithProjection" if with_projection else "CLIPVisionModel"]
    return out


# ViT-L/14 at 224 px: openai/clip-vit-large-patch14, the encoder MIMAFace starts from.
CLIP_VIT_L14 = CLIPVisionConfig(
  hidden_size=1024,
  intermediate_size=4096,
  projection_dim=768,
  num_hidden_layers=24,
  num_attention_heads=16,
  image_size=224,
  patch_size=14,
)
# A CPU-sized ViT with every structural feature of ViT-L/14 (class token, pre/post norms, projection).
CLIP_TINY = CLIPVisionConfig(
  hidden_size=32, intermediate_size=37, projection_dim=16, num_hidden_layers=2, num_attention_heads=4,
  image_size=32, patch_size=8,
)  # fmt: skip


@struct.dataclass
class CLIPVisionOutput:
  """What the encoder returns (fp32); `hidden_states` as transformers' output_hidden_states=True."""

  last_hidden_state: jax.Array  # (B, 1 + P, D), before post_layernorm
  hidden_states: tuple[jax.Array, ...]  # num_layers + 1: the pre-LN-ed embeddings, then each layer's output
  e_id: jax.Array  # (B, D) class token after post_layernorm (transformers' pooler_output)
  image_embeds: jax.Array | None = None  # (B, projection_dim) with a visual projection

  @property
  def e_tex(self) -> jax.Array:
    """(B, P, D) patch tokens of the last layer."""
    return self.last_hidden_state[:, 1:]

  @property
  def pooler_output(self) -> jax.Array:
    return self.e_id


class PatchEmbedding(nnx.Module):
  """Non-overlapping p x p patches -> tokens: a stride-p conv without bias, computed as one matmul."""

  def __init__(self, num_channels: int, hidden_size: int, patch_size: int, *, dtype: Dtype, rngs: nnx.Rngs):
    self.patch_size, self.dtype = patch_size, dtype
    shape = (patch_size, patch_size, num_channels, hidden_size)
    init = nnx.initializers.normal(0.02)
    self.kernel = nnx.Param(
      init(rngs.params(), shape, jnp.float32), out_sharding=("conv_height", "conv_width", "conv_in", "embed")
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, (H/p) * (W/p), D), patches in row-major order as PyTorch's flatten(2)."""
    p = self.patch_size
    b, h, w, c = x.shape
    gh, gw = h // p, w // p
    x = x[:, : gh * p, : gw * p]  # a stride-p conv ignores the remainder rows/columns
    x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
    kernel = self.kernel[...].astype(self.dtype)
    return x.astype(self.dtype) @ kernel.reshape(p * p * c, -1)


class CLIPVisionEmbeddings(nnx.Module):
  """[class token; patch tokens] + learned positions."""

  def __init__(self, cfg: CLIPVisionConfig, *, dtype: Dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.dtype = dtype
    self.class_embedding = nnx.Param(
      nnx.initializers.normal(d**-0.5)(rngs.params(), (d,), jnp.float32), out_sharding=("embed",)
    )
    self.patch_embedding = PatchEmbedding(cfg.num_channels, d, cfg.patch_size, dtype=dtype, rngs=rngs)
    self.position_embedding = nnx.Embed(
      cfg.num_positions,
      d,
      dtype=dtype,
      param_dtype=jnp.float32,
      embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("positions", "embed")),
      rngs=rngs,
    )

  def __call__(self, images: jax.Array) -> jax.Array:
    patches = self.patch_embedding(images)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (patches.shape[0], 1, patches.shape[-1]))
    tokens = jnp.concatenate([cls, patches], axis=1)
    return tokens + self.position_embedding.embedding[...].astype(self.dtype)


class CLIPMLP(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, dtype: Dtype, rngs: nnx.Rngs):
    self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
    self.act = ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-LN transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(self, cfg: CLIPVisionConfig, *, implementation: str | None, dtype: Dtype, rngs: nnx.Rngs):
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    self.layer_norm1 = LayerNorm(d, epsilon=cfg.layer_norm_eps, dtype=dtype)
    # The shared Attention: q/k/v/out projections all biased here; scale head_dim**-0.5 as in CLIP.
    self.self_attn = Attention(
      d, heads=heads, head_dim=d // heads, qkv_bias=True, implementation=implementation, dtype=dtype, rngs=rngs
    )
    self.layer_norm2 = LayerNorm(d, epsilon=cfg.layer_norm_eps, dtype=dtype)
    self.mlp = CLIPMLP(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, implementation: str | None, dtype: Dtype, rngs: nnx.Rngs):
    self.layers = nnx.List(
      [
        CLIPEncoderLayer(cfg, implementation=implementation, dtype=dtype, rngs=rngs)
        for _ in range(cfg.num_hidden_layers)
      ]
    )

  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """All hidden states: the input, then each layer's output."""
    states = [x]
    for layer in self.layers:
      states.append(layer(states[-1]))
    return tuple(states)


class CLIPVisionEncoder(nnx.Module):
  """transformers' CLIPVisionModel (+ visual_projection as CLIPVisionModelWithProjection) on NHWC images."""

  def __init__(
    self,
    config: CLIPVisionConfig,
    *,
    with_projection: bool = False,
    dtype: Dtype = jnp.float32,
    attention_impl: str | None = None,
    rngs: nnx.Rngs,
  ):
    cfg = self.config = config
    self.with_projection = with_projection
    self.dtype = dtype
    d = cfg.hidden_size
    self.embeddings = CLIPVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
    self.pre_layernorm = LayerNorm(d, epsilon=cfg.layer_norm_eps, dtype=dtype)
    self.encoder = CLIPEncoder(cfg, implementation=attention_impl, dtype=dtype, rngs=rngs)
    self.post_layernorm = LayerNorm(d, epsilon=cfg.layer_norm_eps, dtype=dtype)
    self.visual_projection = (
      linear(d, cfg.projection_dim, axes=("embed", "embed_out"), use_bias=False, dtype=dtype, rngs=rngs)
      if with_projection
      else None
    )

  def __call__(self, images: jax.Array) -> CLIPVisionOutput:
    """images: (B, image_size, image_size, num_channels), already normalised by `preprocess`."""
    cfg = self.config
    expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(
        f"CLIP vision encoder expects channels-last images (B, {', '.join(map(str, expected))}) "
        f"matching its {cfg.num_positions}-entry position table; got {tuple(images.shape)}"
      )
    x = self.pre_layernorm(self.embeddings(images))
    hidden_states = self.encoder(x)
    last = hidden_states[-1]
    e_id = self.post_layernorm(last[:, 0])
    image_embeds = self.visual_projection(e_id) if self.visual_projection is not None else None
    f32 = lambda a: None if a is None else a.astype(jnp.float32)
    return CLIPVisionOutput(
      last_hidden_state=f32(last),
      hidden_states=tuple(f32(h) for h in hidden_states),
      e_id=f32(e_id),
      image_embeds=f32(image_embeds),
    )


def _resize_like_pil(x: jax.Array, height: int, width: int, round_to_uint8: bool) -> jax.Array:
  """PIL's separable BICUBIC on [0, 1] images: width pass, then height pass, each clipped (and rounded)."""
  b, h, w, c = x.shape

  def settle(y):
    # PIL resamples uint8 images into uint8 after each pass, clipping bicubic's overshoot at edges.
    return jnp.clip(jnp.round(y * 255.0) / 255.0 if round_to_uint8 else y, 0.0, 1.0)

  if w != width:
    x = settle(jax.image.resize(x, (b, h, width, c), method="bicubic"))
  if h != height:
    x = settle(jax.image.resize(x, (b, height, width, c), method="bicubic"))
  return x


def preprocess(
  images: jax.Array,
  image_size: int = 224,
  mean: tuple[float, ...] = CLIP_MEAN,
  std: tuple[float, ...] = CLIP_STD,
  round_to_uint8: bool = True,
) -> jax.Array:
  """CLIPImageProcessor in JAX: shortest edge to image_size (bicubic), centre crop, [0, 1], mean/std.

  `images` (B, H, W, C) are uint8 in [0, 255] or floats in [0, 1]. `jax.image.resize(..., "bicubic")`
  is PIL's BICUBIC kernel (Keys a=-0.5, widened when shrinking); like PIL on uint8 images, the
  width and height passes each clip and round to uint8 levels, which leaves one level of difference
  (0.015 after dividing by CLIP's std) on under 0.1% of pixels, from rounding ties. round_to_uint8=False
  keeps the clipping but not the rounding (a resize with useful gradients; within a level of PIL's).
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != len(mean):
    raise ValueError(f"preprocess expects channels-last images (B, H, W, {len(mean)}); got {images.shape}")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = images.astype(jnp.float32)
  else:
    raise ValueError(f"preprocess expects uint8 images in [0, 255] or floats in [0, 1]; got dtype {images.dtype}")
  h, w = x.shape[1:3]
  # Shortest edge -> image_size, the other edge truncated as transformers' get_resize_output_image_size.
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(image_size * long / short)
  nh, nw = (new_long, image_size) if w <= h else (image_size, new_long)
  x = _resize_like_pil(x, nh, nw, round_to_uint8)
  top, left = (nh - image_size) // 2, (nw - image_size) // 2
  x = x[:, top : top + image_size, left : left + image_size]
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
