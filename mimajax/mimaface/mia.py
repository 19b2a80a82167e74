"""Motion-Identity modulated Appearance (MIA, MIMAFace section "MIA", eq. 1): the U-Net's appearance condition.

Two variants, chosen by `MIAConfig.variant`:

"paper" (`MotionIdentityAdapter`): CLIP ViT-L/14 patch tokens e_tex and class token e_id;
  e_tex' = e_tex + CrossAttn(LN(e_tex), [rho; beta; g]) with rho = angle + translation (6),
  beta = expression (64), g = gaze (4), each group embedded as one token by its own Linear to
  clip_dim (the paper does not say how the coefficients reach the key width; one token per group
  keeps them separable for the attention). The cross-attention's output projection is
  zero-initialised, so at init e_tex' == e_tex and a pretrained CLIP's features pass unchanged.
  Then [e_tex'; e_id] (e_id appended as the last token) -> 3 pre-LN transformer layers at clip_dim
  -> LayerNorm -> Linear to cross_attention_dim: (B, P + 1, 768), the U-Net's encoder_hidden_states.

"release" (`ReleaseMIA`, the official `MIMAFacePostfuseModule`, models/mimaface.py of
  MIMAFace2024/MIMAFace): a Linear to 768 per input, tokens concatenated in the order
  `RELEASE_TOKEN_ORDER` = [face-recognition feature, gaze, exp, tex, gamma, angles, translation,
  CLIP hidden states (257)] -> 264 tokens, a CLIP-style transformer (`Transformer(1, 768, 3, 1)`:
  3 layers, 1 head, fused qkv) and a LayerNorm; in video mode the output is averaged over frames
  (as its infer_video.py / train_video.py do; they flatten frames as `object_embeds257.repeat(1, F, 1, 1)`
  against `(b f)`-ordered coefficients, which pairs sources and frames correctly only for B = 1; here
  each sample's frames use its own source). The CLIP input is the vision tower's `last_hidden_state`
  (before `post_layernorm`). Attribute names are the release's, so the PyTorch
  keys map one to one (`transform_dim_clip.weight` -> `transform_dim_clip.kernel`, transposed;
  `mapper.resblocks.0.attn.c_qkv.weight`, `layer_norm.weight` -> `.scale`, ...).

3DMM coefficients use the Deep3DFaceRecon layout (`split_coefficients`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.face3d.coefficients import COEFFICIENT_SLICES, COEFFICIENT_WIDTHS  # noqa: F401  (re-exported)
from mimajax.face3d.coefficients import split as split_coefficients
from mimajax.models.attention import ATTENTION_IMPLEMENTATIONS, Attention, dot_product_attention
from mimajax.models.layers import LayerNorm, linear

Dtype = Any


# Token order of the release's concatenation (MIMAFacePostfuseModule.forward); "clip" is 257 tokens.
RELEASE_TOKEN_ORDER = ("arcface", "gaze", "expression", "texture", "gamma", "angle", "translation", "clip")


@dataclasses.dataclass(frozen=True)
class MIAConfig:
  """Sizes of the appearance adapter; the defaults are CLIP ViT-L/14 into the SD1.5 U-Net."""

  variant: str = "paper"  # "paper" | "release"
  clip_dim: int = 1024  # ViT-L/14 hidden width
  cross_attention_dim: int = 768  # SD1.5 U-Net context width
  gaze_dim: int = 4
  expression_dim: int = 64
  pose_dim: int = 6  # angle 3 + translation 3
  num_heads: int = 16  # paper variant: heads of the motion cross-attention and the adapter (head_dim 64)
  adapter_layers: int = 3  # paper: "an adapter f constructed by a 3-layer transformer"
  mlp_ratio: int = 4
  # Release variant.
  texture_dim: int = 80
  gamma_dim: int = 27
  angle_dim: int = 3
  translation_dim: int = 3
  face_recognition_dim: int = 25088  # CurricularFace deep features (512 x 7 x 7), flattened
  clip_tokens: int = 257  # CLIP last_hidden_state: class token + 16 x 16 patches
  release_layers: int = 3  # the release's `Transformer(n_ctx=1, width=768, layers=3, heads=1)`
  release_heads: int = 1

  def __post_init__(self):
    if self.variant not in ("paper", "release"):
      raise ValueError(f"MIAConfig.variant {self.variant!r} unknown; expected 'paper' or 'release'")
    if self.clip_dim % self.num_heads:
      raise ValueError(f"MIAConfig: clip_dim={self.clip_dim} is not divisible by num_heads={self.num_heads}")
    if self.cross_attention_dim % self.release_heads:
      raise ValueError(
        f"MIAConfig: cross_attention_dim={self.cross_attention_dim} is not divisible by "
        f"release_heads={self.release_heads}"
      )

  @property
  def release_tokens(self) -> int:
    """Tokens the release variant outputs: one per coefficient group and face feature, plus the CLIP tokens."""
    return len(RELEASE_TOKEN_ORDER) - 1 + self.clip_tokens


def _as_groups(motion: jax.Array | Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  if isinstance(motion, Mapping):
    return dict(motion)
  return split_coefficients(jnp.asarray(motion))


def _check_width(name: str, x: jax.Array, width: int) -> jax.Array:
  if x.shape[-1] != width:
    raise ValueError(f"MIA: motion group {name!r} has shape {tuple(x.shape)}; expected last dimension {width}")
  return x


def split_clip_tokens(hidden_states: jax.Array) -> tuple[jax.Array, jax.Array]:
  """CLIP vision hidden states (B, 1 + P, C) -> (e_tex (B, P, C) patch tokens, e_id (B, C) class token)."""
  if hidden_states.ndim != 3:
    raise ValueError(f"CLIP hidden states must be (B, 1 + P, C); got shape {hidden_states.shape}")
  return hidden_states[:, 1:], hidden_states[:, 0]


class FusedSelfAttention(nnx.Module):
  """Self-attention with one fused qkv Linear laid out per head as [q_h | k_h | v_h] (CLIP/the release)."""

  def __init__(self, width: int, *, heads: int, implementation: str | None, dtype: Dtype, rngs: nnx.Rngs):
    self.heads, self.head_dim, self.implementation, self.dtype = heads, width // heads, implementation, dtype
    # The per-head interleaving keeps whole heads contiguous, so sharding the fused axis splits by head.
    self.c_qkv = linear(width, 3 * width, axes=("embed", "heads"), dtype=dtype, rngs=rngs)
    self.c_proj = linear(width, width, axes=("heads", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    qkv = self.c_qkv(x).reshape(b, t, self.heads, 3 * self.head_dim).astype(self.dtype)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    out = dot_product_attention(q, k, v, self.implementation)
    return self.c_proj(out.reshape(b, t, self.heads * self.head_dim))


class MLP(nnx.Module):
  """Transformer MLP: c_fc -> exact GELU -> c_proj."""

  def __init__(self, width: int, *, ratio: int, dtype: Dtype, rngs: nnx.Rngs):
    self.c_fc = linear(width, width * ratio, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.c_proj = linear(width * ratio, width, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=False))


class ResidualAttentionBlock(nnx.Module):
  """Pre-LN transformer layer: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

  def __init__(
    self, width: int, *, heads: int, mlp_ratio: int, implementation: str | None, dtype: Dtype, rngs: nnx.Rngs
  ):
    self.ln_1 = LayerNorm(width, dtype=dtype)
    self.attn = FusedSelfAttention(width, heads=heads, implementation=implementation, dtype=dtype, rngs=rngs)
    self.ln_2 = LayerNorm(width, dtype=dtype)
    self.mlp = MLP(width, ratio=mlp_ratio, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class AdapterTransformer(nnx.Module):
  """A stack of `ResidualAttentionBlock`s (`resblocks`, as the release's `Transformer`)."""

  def __init__(
    self,
    width: int,
    *,
    layers: int,
    heads: int,
    mlp_ratio: int = 4,
    implementation: str | None = None,
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    kw = dict(heads=heads, mlp_ratio=mlp_ratio, implementation=implementation, dtype=dtype, rngs=rngs)
    self.resblocks = nnx.List([ResidualAttentionBlock(width, **kw) for _ in range(layers)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.resblocks:
      x = block(x)
    return x


def _check_implementation(implementation):
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation {implementation!r} unknown; expected one of {ATTENTION_IMPLEMENTATIONS}"
    )


class MotionIdentityAdapter(nnx.Module):
  """The paper's MIA: motion cross-attention on e_tex (eq. 1), then [e_tex'; e_id] through the adapter f."""

  def __init__(self, cfg: MIAConfig, *, implementation: str | None = None, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    _check_implementation(implementation)
    self.cfg = cfg
    d = cfg.clip_dim
    self.pose_embed = linear(cfg.pose_dim, d, axes=(None, "embed"), dtype=dtype, rngs=rngs)
    self.expression_embed = linear(cfg.expression_dim, d, axes=(None, "embed"), dtype=dtype, rngs=rngs)
    self.gaze_embed = linear(cfg.gaze_dim, d, axes=(None, "embed"), dtype=dtype, rngs=rngs)
    self.motion_norm = LayerNorm(d, dtype=dtype)
    self.motion_attn = Attention(
      d, heads=cfg.num_heads, head_dim=d // cfg.num_heads, implementation=implementation, dtype=dtype, rngs=rngs
    )
    # Zero output projection: at init e_tex' == e_tex, the motion path grows from nothing (as ControlNet's zero convs).
    self.motion_attn.to_out.kernel[...] = jnp.zeros_like(self.motion_attn.to_out.kernel[...])
    self.adapter = AdapterTransformer(
      d,
      layers=cfg.adapter_layers,
      heads=cfg.num_heads,
      mlp_ratio=cfg.mlp_ratio,
      implementation=implementation,
      dtype=dtype,
      rngs=rngs,
    )
    self.norm_out = LayerNorm(d, dtype=dtype)
    self.proj_out = linear(d, cfg.cross_attention_dim, axes=("embed", "embed_out"), dtype=dtype, rngs=rngs)

  def motion_tokens(self, motion: jax.Array | Mapping[str, jax.Array]) -> jax.Array:
    """[rho; beta; g] as tokens (..., 3, clip_dim); a missing gaze (257-column coefficients) is a zero vector."""
    groups = _as_groups(motion)
    if "pose" in groups:
      pose = groups["pose"]
    elif "angle" in groups and "translation" in groups:
      pose = jnp.concatenate([groups["angle"], groups["translation"]], axis=-1)
    else:
      raise ValueError(f"MIA motion needs 'pose' or 'angle' + 'translation'; got groups {sorted(groups)}")
    if "expression" not in groups:
      raise ValueError(f"MIA motion needs 'expression'; got groups {sorted(groups)}")
    expression = groups["expression"]
    gaze = groups.get("gaze")
    if gaze is None:  # no gaze estimate: the gaze token is the embedding's bias alone
      gaze = jnp.zeros(expression.shape[:-1] + (self.cfg.gaze_dim,), expression.dtype)
    cfg = self.cfg
    tokens = [
      self.pose_embed(_check_width("pose", pose, cfg.pose_dim)),
      self.expression_embed(_check_width("expression", expression, cfg.expression_dim)),
      self.gaze_embed(_check_width("gaze", gaze, cfg.gaze_dim)),
    ]
    return jnp.stack(tokens, axis=-2)

  def __call__(self, e_tex: jax.Array, e_id: jax.Array, motion: jax.Array | Mapping[str, jax.Array]) -> jax.Array:
    """e_tex (B, P, C), e_id (B, C) | (B, 1, C), motion (B, ...) -> (B, P+1, D); (B, F, ...) -> (B, F, P+1, D)."""
    c = self.cfg.clip_dim
    if e_tex.ndim != 3 or e_tex.shape[-1] != c:
      raise ValueError(f"MIA: e_tex must be (B, P, {c}); got shape {e_tex.shape}")
    e_id = e_id[:, None] if e_id.ndim == 2 else e_id
    if e_id.shape != (e_tex.shape[0], 1, c):
      raise ValueError(f"MIA: e_id must be (B, {c}) or (B, 1, {c}) with B={e_tex.shape[0]}; got shape {e_id.shape}")
    motion = self.motion_tokens(motion)
    if motion.shape[0] != e_tex.shape[0] or motion.ndim not in (3, 4):
      raise ValueError(
        f"MIA: motion must be (B, ...) or (B, F, ...) with B={e_tex.shape[0]}; got motion tokens {motion.shape}"
      )
    frames = motion.shape[1] if motion.ndim == 4 else None
    if frames is not None:  # one condition per driving frame: the source tokens are shared by the clip
      b, p = e_tex.shape[:2]
      e_tex = jnp.broadcast_to(e_tex[:, None], (b, frames, p, c)).reshape(b * frames, p, c)
      e_id = jnp.broadcast_to(e_id[:, None], (b, frames, 1, c)).reshape(b * frames, 1, c)
      motion = motion.reshape(b * frames, *motion.shape[2:])
    e_tex_mod = e_tex + self.motion_attn(self.motion_norm(e_tex), motion.astype(e_tex.dtype))
    x = jnp.concatenate([e_tex_mod, e_id.astype(e_tex_mod.dtype)], axis=1)
    out = self.proj_out(self.norm_out(self.adapter(x)))
    return out if frames is None else out.reshape(-1, frames, *out.shape[1:])


class ReleaseMIA(nnx.Module):
  """The release's post-fuse module: a Linear per input to 768, concatenated tokens, transformer, LayerNorm."""

  def __init__(self, cfg: MIAConfig, *, implementation: str | None = None, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    _check_implementation(implementation)
    self.cfg = cfg
    d = cfg.cross_attention_dim
    small = dict(axes=(None, "embed"), dtype=dtype, rngs=rngs)
    self.transform_dim_clip = linear(cfg.clip_dim, d, axes=("embed", "embed_out"), dtype=dtype, rngs=rngs)
    self.transform_dim_arcface = linear(
      cfg.face_recognition_dim, d, axes=("embed", "embed_out"), dtype=dtype, rngs=rngs
    )
    self.transform_dim_gaze = linear(cfg.gaze_dim, d, **small)
    self.transform_dim_exp = linear(cfg.expression_dim, d, **small)
    self.transform_dim_tex = linear(cfg.texture_dim, d, **small)
    self.transform_dim_gamma = linear(cfg.gamma_dim, d, **small)
    self.transform_dim_angles = linear(cfg.angle_dim, d, **small)
    self.transform_dim_translation = linear(cfg.translation_dim, d, **small)
    self.mapper = AdapterTransformer(
      d,
      layers=cfg.release_layers,
      heads=cfg.release_heads,
      mlp_ratio=cfg.mlp_ratio,
      implementation=implementation,
      dtype=dtype,
      rngs=rngs,
    )
    self.layer_norm = LayerNorm(d, dtype=dtype)

  def _coefficient_tokens(self, motion) -> jax.Array:
    groups = _as_groups(motion)
    cfg = self.cfg
    table = (
      ("gaze", self.transform_dim_gaze, cfg.gaze_dim),
      ("expression", self.transform_dim_exp, cfg.expression_dim),
      ("texture", self.transform_dim_tex, cfg.texture_dim),
      ("gamma", self.transform_dim_gamma, cfg.gamma_dim),
      ("angle", self.transform_dim_angles, cfg.angle_dim),
      ("translation", self.transform_dim_translation, cfg.translation_dim),
    )
    missing = [name for name, _, _ in table if name not in groups]
    if missing:
      raise ValueError(
        f"release MIA needs coefficient groups {[n for n, _, _ in table]} (261-column coefficients with gaze); "
        f"missing {missing}"
      )
    return jnp.stack([proj(_check_width(name, groups[name], w)) for name, proj, w in table], axis=-2)

  def __call__(
    self,
    clip_hidden_states: jax.Array,
    face_features: jax.Array,
    motion: jax.Array | Mapping[str, jax.Array],
  ) -> jax.Array:
    """CLIP (B, 257, 1024), face feature (B, 25088), motion (B, 261) -> (B, 264, 768).

    Video mode: motion (B, F, ...) per frame, with the source inputs either per sample or per frame
    ((B, F, 257, 1024), (B, F, 25088)); the per-frame outputs are averaged over F.
    """
    coeff_tokens = self._coefficient_tokens(motion)  # (B, 6, D) or (B, F, 6, D)
    b = coeff_tokens.shape[0]
    frames = coeff_tokens.shape[1] if coeff_tokens.ndim == 4 else None
    lead = (b,) if frames is None else (b, frames)
    cfg = self.cfg

    def source_tokens(x, proj, trailing, name):
      # Source features are shared by the clip: project once per sample, then broadcast to the frames.
      if x.shape == (b,) + trailing:
        y = proj(x)
        return y if frames is None else jnp.broadcast_to(y[:, None], (b, frames) + y.shape[1:])
      if frames is not None and x.shape == (b, frames) + trailing:
        return proj(x)
      expected = f"{(b,) + trailing}" + ("" if frames is None else f" or {(b, frames) + trailing}")
      raise ValueError(f"release MIA: {name} has shape {tuple(x.shape)}; expected {expected}")

    clip_shape = (cfg.clip_tokens, cfg.clip_dim)
    clip_tokens = source_tokens(clip_hidden_states, self.transform_dim_clip, clip_shape, "clip_hidden_states")
    face_shape = (cfg.face_recognition_dim,)
    face_token = source_tokens(face_features, self.transform_dim_arcface, face_shape, "face_features")[..., None, :]
    tokens = jnp.concatenate([face_token, coeff_tokens.astype(clip_tokens.dtype), clip_tokens], axis=-2)
    tokens = tokens.reshape(-1, *tokens.shape[-2:])
    out = self.layer_norm(self.mapper(tokens)).reshape(*lead, *tokens.shape[-2:])
    return out if frames is None else out.astype(jnp.float32).mean(axis=1).astype(out.dtype)


def build_mia(
  cfg: MIAConfig, *, implementation: str | None = None, dtype: Dtype = jnp.float32, rngs: nnx.Rngs
) -> MotionIdentityAdapter | ReleaseMIA:
  """The adapter of `cfg.variant`."""
  cls = MotionIdentityAdapter if cfg.variant == "paper" else ReleaseMIA
  return cls(cfg, implementation=implementation, dtype=dtype, rngs=rngs)


def drop_condition(rng: jax.Array, cond: jax.Array, p: float | jax.Array, *, per_batch: bool = False) -> jax.Array:
  """Zeros the appearance condition of each sample (leading axis) with probability p, for classifier-free guidance.

  Per-sample Bernoulli, or one draw for the whole batch (per_batch: the release's `random.random() < 0.1`);
  jittable, p may be traced.
  """
  draws = 1 if per_batch else cond.shape[0]
  keep = jnp.broadcast_to(jax.random.bernoulli(rng, 1.0 - jnp.asarray(p, jnp.float32), (draws,)), (cond.shape[0],))
  return jnp.where(keep.reshape((-1,) + (1,) * (cond.ndim - 1)), cond, jnp.zeros((), cond.dtype))
