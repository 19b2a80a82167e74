"""MIA (MIMAFace section "MIA", eq. 1) in PyTorch: the same math as `mimajax.mimaface.mia`, for exported models.

State-dict keys are mimajax's parameter paths with "/" -> "." and the leaf named as PyTorch names it
(`kernel` -> `weight`, transposed; `scale` -> `weight`), so `mia/mia.safetensors` of an export loads with
`load_state_dict(strict=True)`. Both variants: "paper" (`MotionIdentityAdapter`) and "release" (`ReleaseMIA`,
the official `MIMAFacePostfuseModule`). Coefficients use the Deep3DFaceRecon layout (257, or 261 with gaze).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimajax.face3d.coefficients import COEFFICIENT_SLICES, COEFFICIENT_WIDTHS
from mimajax.mimaface.mia import MIAConfig


def split_coefficients(coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
  """(..., 257 | 261) -> {group: (..., width)} ("gaze" only for 261 columns), as face3d.coefficients.split."""
  width = coeffs.shape[-1]
  if width not in COEFFICIENT_WIDTHS:
    raise ValueError(
      f"3DMM coefficients have {width} columns (shape {tuple(coeffs.shape)}); expected 257 or 261 (with gaze)"
    )
  return {name: coeffs[..., a:b] for name, (a, b) in COEFFICIENT_SLICES.items() if b <= width}


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
  """(B, T, heads * d) -> (B, heads, T, d)."""
  b, t, _ = x.shape
  return x.view(b, t, heads, -1).transpose(1, 2)


class Attention(nn.Module):
  """Multi-head attention: q/k/v projections without bias, a biased output projection (mimajax's Attention)."""

  def __init__(self, dim: int, heads: int, head_dim: int):
    super().__init__()
    self.heads = heads
    inner = heads * head_dim
    self.to_q = nn.Linear(dim, inner, bias=False)
    self.to_k = nn.Linear(dim, inner, bias=False)
    self.to_v = nn.Linear(dim, inner, bias=False)
    self.to_out = nn.Linear(inner, dim)

  def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    q, k, v = (_heads(proj(y), self.heads) for proj, y in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).flatten(2))


class FusedSelfAttention(nn.Module):
  """Self-attention with one fused qkv Linear laid out per head as [q_h | k_h | v_h] (CLIP / the release)."""

  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.c_qkv = nn.Linear(width, 3 * width)
    self.c_proj = nn.Linear(width, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, d = x.shape
    qkv = self.c_qkv(x).view(b, t, self.heads, 3 * (d // self.heads)).transpose(1, 2)
    q, k, v = qkv.chunk(3, dim=-1)
    return self.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class MLP(nn.Module):
  def __init__(self, width: int, ratio: int):
    super().__init__()
    self.c_fc = nn.Linear(width, width * ratio)
    self.c_proj = nn.Linear(width * ratio, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
  """Pre-LN transformer layer."""

  def __init__(self, width: int, heads: int, mlp_ratio: int):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width)
    self.attn = FusedSelfAttention(width, heads)
    self.ln_2 = nn.LayerNorm(width)
    self.mlp = MLP(width, mlp_ratio)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class AdapterTransformer(nn.Module):
  def __init__(self, width: int, layers: int, heads: int, mlp_ratio: int):
    super().__init__()
    self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for block in self.resblocks:
      x = block(x)
    return x


class MotionIdentityAdapter(nn.Module):
  """The paper's MIA: e_tex' = e_tex + CrossAttn(LN(e_tex), [rho; beta; g]); [e_tex'; e_id] -> adapter -> 768."""

  def __init__(self, cfg: MIAConfig):
    super().__init__()
    self.cfg = cfg
    d = cfg.clip_dim
    self.pose_embed = nn.Linear(cfg.pose_dim, d)
    self.expression_embed = nn.Linear(cfg.expression_dim, d)
    self.gaze_embed = nn.Linear(cfg.gaze_dim, d)
    self.motion_norm = nn.LayerNorm(d)
    self.motion_attn = Attention(d, cfg.num_heads, d // cfg.num_heads)
    self.adapter = AdapterTransformer(d, cfg.adapter_layers, cfg.num_heads, cfg.mlp_ratio)
    self.norm_out = nn.LayerNorm(d)
    self.proj_out = nn.Linear(d, cfg.cross_attention_dim)

  def motion_tokens(self, motion: torch.Tensor) -> torch.Tensor:
    """(..., 257 | 261) coefficients -> (..., 3, clip_dim) tokens [pose; expression; gaze]; no gaze -> zeros."""
    g = split_coefficients(motion)
    pose = torch.cat([g["angle"], g["translation"]], dim=-1)
    gaze = g.get("gaze", torch.zeros(*motion.shape[:-1], self.cfg.gaze_dim, dtype=motion.dtype, device=motion.device))
    return torch.stack([self.pose_embed(pose), self.expression_embed(g["expression"]), self.gaze_embed(gaze)], -2)

  def forward(self, e_tex: torch.Tensor, e_id: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """e_tex (B, P, C), e_id (B, C), motion (B, [F,] 257|261) -> (B, [F,] P + 1, D)."""
    tokens = self.motion_tokens(motion)
    frames = motion.shape[1] if motion.ndim == 3 else None
    e_id = e_id[:, None]
    if frames is not None:  # the source's tokens are shared by every frame of the clip
      e_tex, e_id = (x.repeat_interleave(frames, dim=0) for x in (e_tex, e_id))
      tokens = tokens.flatten(0, 1)
    e_tex = e_tex + self.motion_attn(self.motion_norm(e_tex), tokens)
    out = self.proj_out(self.norm_out(self.adapter(torch.cat([e_tex, e_id], dim=1))))
    return out if frames is None else out.unflatten(0, (-1, frames))


class ReleaseMIA(nn.Module):
  """The release's post-fuse module: a Linear per input, [face, gaze, exp, tex, gamma, angles, trans, clip] tokens."""

  # (coefficient group, attribute suffix) in the release's token order, after the face-recognition token
  COEFFICIENT_TOKENS = (
    ("gaze", "gaze"), ("expression", "exp"), ("texture", "tex"), ("gamma", "gamma"), ("angle", "angles"),
    ("translation", "translation"),
  )  # fmt: skip

  def __init__(self, cfg: MIAConfig):
    super().__init__()
    self.cfg = cfg
    d = cfg.cross_attention_dim
    self.transform_dim_clip = nn.Linear(cfg.clip_dim, d)
    self.transform_dim_arcface = nn.Linear(cfg.face_recognition_dim, d)
    widths = dict(gaze=cfg.gaze_dim, expression=cfg.expression_dim, texture=cfg.texture_dim, gamma=cfg.gamma_dim,
                  angle=cfg.angle_dim, translation=cfg.translation_dim)  # fmt: skip
    for group, suffix in self.COEFFICIENT_TOKENS:
      setattr(self, f"transform_dim_{suffix}", nn.Linear(widths[group], d))
    self.mapper = AdapterTransformer(d, cfg.release_layers, cfg.release_heads, cfg.mlp_ratio)
    self.layer_norm = nn.LayerNorm(d)

  def forward(self, clip_hidden_states: torch.Tensor, face_features: torch.Tensor, motion: torch.Tensor):
    """CLIP last_hidden_state (B, 257, C), face features (B, 25088), motion (B, [F,] 261) -> (B, 264, D).

    With per-frame motion the per-frame outputs are averaged over the clip, as the release does.
    """
    g = split_coefficients(motion)
    if "gaze" not in g:
      raise ValueError("the release MIA needs 261-column coefficients (with gaze at 257:261)")
    frames = motion.shape[1] if motion.ndim == 3 else None
    coeff = torch.stack([getattr(self, f"transform_dim_{s}")(g[n]) for n, s in self.COEFFICIENT_TOKENS], -2)
    source = torch.cat(
      [self.transform_dim_arcface(face_features)[:, None], self.transform_dim_clip(clip_hidden_states)], 1
    )
    if frames is not None:
      source, coeff = source.repeat_interleave(frames, dim=0), coeff.flatten(0, 1)
    tokens = torch.cat([source[:, :1], coeff, source[:, 1:]], dim=1)
    out = self.layer_norm(self.mapper(tokens))
    return out if frames is None else out.unflatten(0, (-1, frames)).mean(dim=1)


def build_mia(cfg: MIAConfig) -> MotionIdentityAdapter | ReleaseMIA:
  """The adapter of `cfg.variant`."""
  return MotionIdentityAdapter(cfg) if cfg.variant == "paper" else ReleaseMIA(cfg)
