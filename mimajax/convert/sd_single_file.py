"""Key map between diffusers' layout and the original Stable Diffusion single-file layout.

The original (CompVis / LDM) checkpoints keep the U-Net under ``model.diffusion_model.``
and the VAE under ``first_stage_model.``; diffusers keeps them as separate
``UNet2DConditionModel`` / ``AutoencoderKL`` state dicts with different module names.

Everything here works on flat ``dict[str, np.ndarray]`` in diffusers' ``state_dict``
naming and PyTorch tensor layout (OIHW convolutions, [out, in] linears). The map is
built from the diffusers config (the ``config.json`` contents) alone, so the complete
expected key set and every expected shape is known before a single tensor is looked
at; any missing, unexpected or mis-shaped key raises :class:`CheckpointKeyError`
listing all of them, and no partial dict is ever returned.

Supported: SD1.x / SD2.x style ``UNet2DConditionModel`` (``CrossAttnDownBlock2D`` /
``DownBlock2D``, ``UNetMidBlock2DCrossAttn``, ``UpBlock2D`` / ``CrossAttnUpBlock2D``,
any number of blocks, int or per-block ``layers_per_block``,
``transformer_layers_per_block``, ``attention_head_dim``, ``cross_attention_dim``,
``use_linear_projection`` True or False, ``resnet_time_scale_shift`` default or
scale_shift) and ``AutoencoderKL`` (any number of blocks and layers; the LDM mid-block
attention stores q/k/v/proj_out as 1x1 conv weights ``[C, C, 1, 1]`` where diffusers
stores Linear ``[C, C]``). Config features outside that (class / addition embeddings,
only_cross_attention, ...) raise ``ValueError`` up front rather than being guessed.

torch is imported only inside :func:`load_single_file`, and only for ``.ckpt`` / ``.pt``
pickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mimajax import atomic
from mimajax.errors import CheckpointKeyError, CheckpointReadError
from mimajax.models.unet_config import per_block_values

__all__ = [
  "CheckpointKeyError",
  "LDM_UNET_PREFIX",
  "LDM_VAE_PREFIX",
  "load_models",
  "load_single_file",
  "save_models",
  "save_single_file",
  "unet_diffusers_to_ldm",
  "unet_expected_shapes",
  "unet_key_map",
  "unet_ldm_to_diffusers",
  "vae_diffusers_to_ldm",
  "vae_expected_shapes",
  "vae_key_map",
  "vae_ldm_to_diffusers",
]

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
# Top-level key prefixes of a standalone LDM VAE file (e.g. vae-ft-mse-840000-ema-pruned.ckpt).
_BARE_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

Shape = tuple[int, ...]

# Listing is capped per category so an entirely wrong config still gives a readable message;
# the complete lists are attached to the exception.
_MAX_LISTED = 200


@dataclass(frozen=True)
class _Entry:
  """One parameter: its name and shape in both layouts (shapes differ only by a reshape)."""

  diffusers_key: str
  ldm_key: str
  diffusers_shape: Shape
  ldm_shape: Shape


# --------------------------------------------------------------------------------------
# config handling
# --------------------------------------------------------------------------------------

_UNET_DEFAULTS: dict[str, Any] = {
  "in_channels": 4,
  "out_channels": 4,
  "down_block_types": (
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
  ),
  "mid_block_type": "UNetMidBlock2DCrossAttn",
  "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  "only_cross_attention": False,
  "block_out_channels": (320, 640, 1280, 1280),
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "cross_attention_dim": 1280,
  "transformer_layers_per_block": 1,
  "reverse_transformer_layers_per_block": None,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "attention_head_dim": 8,
  "num_attention_heads": None,
  "dual_cross_attention": False,
  "use_linear_projection": False,
  "class_embed_type": None,
  "addition_embed_type": None,
  "num_class_embeds": None,
  "resnet_time_scale_shift": "default",
  "time_embedding_type": "positional",
  "time_embedding_dim": None,
  "time_cond_proj_dim": None,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "attention_type": "default",
  "cross_attention_norm": None,
  "mid_block_only_cross_attention": None,
}

_VAE_DEFAULTS: dict[str, Any] = {
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ("DownEncoderBlock2D",),
  "up_block_types": ("UpDecoderBlock2D",),
  "block_out_channels": (64,),
  "layers_per_block": 1,
  "latent_channels": 4,
  "norm_num_groups": 32,
  "use_quant_conv": True,
  "use_post_quant_conv": True,
  "mid_block_add_attention": True,
}


def _as_config(config: Any) -> dict[str, Any]:
  """Accept a mapping (config.json contents / diffusers FrozenDict) or a path to one."""
  if isinstance(config, (str, os.PathLike)):
    path = os.fspath(config)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  if not isinstance(config, Mapping):
    raise TypeError(f"config must be a mapping or a path to config.json, got {type(config).__name__}")
  return dict(config)


def _get(config: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
  return config.get(key, defaults[key])


def _unet_config(config: Any) -> dict[str, Any]:
  cfg = _as_config(config)
  g = lambda k: _get(cfg, _UNET_DEFAULTS, k)  # noqa: E731

  down = [str(t) for t in g("down_block_types")]
  up = [str(t) for t in g("up_block_types")]
  boc = [int(c) for c in (g("block_out_channels") or ())]
  n = len(down)

  problems = []
  if len(up) != n or len(boc) != n:
    problems.append(
      f"down_block_types ({len(down)}), up_block_types ({len(up)}) and block_out_channels ({len(boc)})"
      " must have the same length"
    )
  for t in down:
    if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
      problems.append(f"down block type {t!r} (supported: CrossAttnDownBlock2D, DownBlock2D)")
  for t in up:
    if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
      problems.append(f"up block type {t!r} (supported: CrossAttnUpBlock2D, UpBlock2D)")
  if g("mid_block_type") != "UNetMidBlock2DCrossAttn":
    problems.append(f"mid_block_type {g('mid_block_type')!r} (supported: UNetMidBlock2DCrossAttn)")
  only_cross = g("only_cross_attention")
  if any(per_block_values(only_cross, max(n, 1), "only_cross_attention")) or g("mid_block_only_cross_attention"):
    problems.append("only_cross_attention / mid_block_only_cross_attention")
  for key in (
    "class_embed_type",
    "addition_embed_type",
    "num_class_embeds",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "time_cond_proj_dim",
    "cross_attention_norm",
    "reverse_transformer_layers_per_block",
  ):
    if g(key) is not None:
      problems.append(f"{key}={g(key)!r}")
  if g("dual_cross_attention"):
    problems.append("dual_cross_attention=True")
  if g("attention_type") != "default":
    problems.append(f"attention_type={g('attention_type')!r}")
  if g("time_embedding_type") != "positional":
    problems.append(f"time_embedding_type={g('time_embedding_type')!r}")
  if g("resnet_time_scale_shift") not in ("default", "scale_shift"):
    problems.append(f"resnet_time_scale_shift={g('resnet_time_scale_shift')!r}")
  for key in ("norm_num_groups", "cross_attention_dim", "layers_per_block", "block_out_channels"):
    if g(key) is None:
      problems.append(f"{key}=None")
  if g("num_attention_heads") is None and g("attention_head_dim") is None:
    problems.append("attention_head_dim=None and num_attention_heads=None")
  tlpb = g("transformer_layers_per_block")
  if isinstance(tlpb, (list, tuple)) and any(isinstance(t, (list, tuple)) for t in tlpb):
    problems.append("nested transformer_layers_per_block")
  if problems:
    raise ValueError("UNet config not supported by the SD single-file key map: " + "; ".join(problems))

  heads = g("num_attention_heads") or g("attention_head_dim")
  return {
    "in_channels": int(g("in_channels")),
    "out_channels": int(g("out_channels")),
    "down_block_types": down,
    "up_block_types": up,
    "block_out_channels": boc,
    "layers_per_block": [int(x) for x in per_block_values(g("layers_per_block"), n, "layers_per_block")],
    "transformer_layers_per_block": [int(x) for x in per_block_values(tlpb, n, "transformer_layers_per_block")],
    "num_attention_heads": [int(x) for x in per_block_values(heads, n, "attention_head_dim")],
    "cross_attention_dim": [int(x) for x in per_block_values(g("cross_attention_dim"), n, "cross_attention_dim")],
    "use_linear_projection": bool(g("use_linear_projection")),
    "scale_shift": g("resnet_time_scale_shift") == "scale_shift",
    "time_embed_dim": int(g("time_embedding_dim") or boc[0] * 4),
    "conv_in_kernel": int(g("conv_in_kernel")),
    "conv_out_kernel": int(g("conv_out_kernel")),
  }


def _vae_config(config: Any) -> dict[str, Any]:
  cfg = _as_config(config)
  g = lambda k: _get(cfg, _VAE_DEFAULTS, k)  # noqa: E731
  down = [str(t) for t in g("down_block_types")]
  up = [str(t) for t in g("up_block_types")]
  boc = [int(c) for c in (g("block_out_channels") or ())]
  problems = []
  if not (len(down) == len(up) == len(boc)):
    problems.append(
      f"down_block_types ({len(down)}), up_block_types ({len(up)}) and block_out_channels ({len(boc)})"
      " must have the same length"
    )
  for t in down:
    if t != "DownEncoderBlock2D":
      problems.append(f"down block type {t!r} (supported: DownEncoderBlock2D)")
  for t in up:
    if t != "UpDecoderBlock2D":
      problems.append(f"up block type {t!r} (supported: UpDecoderBlock2D)")
  if isinstance(g("layers_per_block"), (list, tuple)):
    problems.append("per-block layers_per_block (AutoencoderKL takes an int)")
  if problems:
    raise ValueError("AutoencoderKL config not supported by the SD single-file key map: " + "; ".join(problems))
  return {
    "in_channels": int(g("in_channels")),
    "out_channels": int(g("out_channels")),
    "block_out_channels": boc,
    "layers_per_block": int(g("layers_per_block")),
    "latent_channels": int(g("latent_channels")),
    "use_quant_conv": bool(g("use_quant_conv")),
    "use_post_quant_conv": bool(g("use_post_quant_conv")),
    "mid_attention": bool(g("mid_block_add_attention")),
  }


def _unet_summary(c: Mapping[str, Any]) -> str:
  keys = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "transformer_layers_per_block",
    "num_attention_heads",
    "cross_attention_dim",
    "use_linear_projection",
    "time_embed_dim",
  )
  parts = [f"{k}={c[k]}" for k in keys]
  parts.append("resnet_time_scale_shift=" + ("scale_shift" if c["scale_shift"] else "default"))
  return "UNet2DConditionModel(" + ", ".join(parts) + ")"


def _vae_summary(c: Mapping[str, Any]) -> str:
  keys = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "use_quant_conv",
    "use_post_quant_conv",
  )
  parts = [f"{k}={c[k]}" for k in keys] + [f"mid_block_add_attention={c['mid_attention']}"]
  return "AutoencoderKL(" + ", ".join(parts) + ")"


# --------------------------------------------------------------------------------------
# entry builders
# --------------------------------------------------------------------------------------


class _Spec:
  def __init__(self) -> None:
    self.entries: list[_Entry] = []

  def add(self, d: str, l: str, d_shape: Shape, l_shape: Shape | None = None) -> None:  # noqa: E741
    self.entries.append(_Entry(d, l, tuple(d_shape), tuple(l_shape if l_shape is not None else d_shape)))

  def norm(self, d: str, l: str, c: int) -> None:  # noqa: E741
    self.add(f"{d}.weight", f"{l}.weight", (c,))
    self.add(f"{d}.bias", f"{l}.bias", (c,))

  def linear(self, d: str, l: str, out: int, inp: int, bias: bool = True) -> None:  # noqa: E741
    self.add(f"{d}.weight", f"{l}.weight", (out, inp))
    if bias:
      self.add(f"{d}.bias", f"{l}.bias", (out,))

  def conv(self, d: str, l: str, out: int, inp: int, k: int) -> None:  # noqa: E741
    self.add(f"{d}.weight", f"{l}.weight", (out, inp, k, k))
    self.add(f"{d}.bias", f"{l}.bias", (out,))

  def linear_as_conv(self, d: str, l: str, out: int, inp: int) -> None:  # noqa: E741
    """diffusers Linear [out, in] <-> LDM 1x1 conv [out, in, 1, 1]."""
    self.add(f"{d}.weight", f"{l}.weight", (out, inp), (out, inp, 1, 1))
    self.add(f"{d}.bias", f"{l}.bias", (out,))


def _unet_resnet(s: _Spec, d: str, l: str, cin: int, cout: int, temb: int, scale_shift: bool) -> None:  # noqa: E741
  s.norm(f"{d}.norm1", f"{l}.in_layers.0", cin)
  s.conv(f"{d}.conv1", f"{l}.in_layers.2", cout, cin, 3)
  s.linear(f"{d}.time_emb_proj", f"{l}.emb_layers.1", 2 * cout if scale_shift else cout, temb)
  s.norm(f"{d}.norm2", f"{l}.out_layers.0", cout)
  s.conv(f"{d}.conv2", f"{l}.out_layers.3", cout, cout, 3)
  if cin != cout:
    s.conv(f"{d}.conv_shortcut", f"{l}.skip_connection", cout, cin, 1)


def _unet_transformer(
  s: _Spec,
  d: str,
  l: str,
  c: int,
  heads: int,
  depth: int,
  cross: int,
  linear_proj: bool,  # noqa: E741
) -> None:
  # Transformer2DModel and LDM's SpatialTransformer share every name below the block prefix.
  inner = heads * (c // heads)
  s.norm(f"{d}.norm", f"{l}.norm", c)
  if linear_proj:
    s.linear(f"{d}.proj_in", f"{l}.proj_in", inner, c)
  else:
    s.conv(f"{d}.proj_in", f"{l}.proj_in", inner, c, 1)
  for k in range(depth):
    bd, bl = f"{d}.transformer_blocks.{k}", f"{l}.transformer_blocks.{k}"
    for attn, kv_dim in (("attn1", inner), ("attn2", cross)):
      s.linear(f"{bd}.{attn}.to_q", f"{bl}.{attn}.to_q", inner, inner, bias=False)
      s.linear(f"{bd}.{attn}.to_k", f"{bl}.{attn}.to_k", inner, kv_dim, bias=False)
      s.linear(f"{bd}.{attn}.to_v", f"{bl}.{attn}.to_v", inner, kv_dim, bias=False)
      s.linear(f"{bd}.{attn}.to_out.0", f"{bl}.{attn}.to_out.0", inner, inner)
    s.linear(f"{bd}.ff.net.0.proj", f"{bl}.ff.net.0.proj", inner * 8, inner)  # GEGLU: 2 * 4 * dim
    s.linear(f"{bd}.ff.net.2", f"{bl}.ff.net.2", inner, inner * 4)
    for i in (1, 2, 3):
      s.norm(f"{bd}.norm{i}", f"{bl}.norm{i}", inner)
  if linear_proj:
    s.linear(f"{d}.proj_out", f"{l}.proj_out", c, inner)
  else:
    s.conv(f"{d}.proj_out", f"{l}.proj_out", c, inner, 1)


def _unet_entries(c: Mapping[str, Any]) -> list[_Entry]:
  s = _Spec()
  boc = c["block_out_channels"]
  n = len(boc)
  temb = c["time_embed_dim"]
  ss = c["scale_shift"]
  lin = c["use_linear_projection"]

  s.linear("time_embedding.linear_1", "time_embed.0", temb, boc[0])
  s.linear("time_embedding.linear_2", "time_embed.2", temb, temb)
  s.conv("conv_in", "input_blocks.0.0", boc[0], c["in_channels"], c["conv_in_kernel"])

  # Down path: LDM numbers every resnet(+attention) and every downsampler as its own
  # input_blocks entry, starting after conv_in (input_blocks.0).
  idx = 1
  out_ch = boc[0]
  for i, block_type in enumerate(c["down_block_types"]):
    in_ch, out_ch = out_ch, boc[i]
    has_attn = block_type == "CrossAttnDownBlock2D"
    for j in range(c["layers_per_block"][i]):
      _unet_resnet(
        s,
        f"down_blocks.{i}.resnets.{j}",
        f"input_blocks.{idx}.0",
        in_ch if j == 0 else out_ch,
        out_ch,
        temb,
        ss,
      )
      if has_attn:
        _unet_transformer(
          s,
          f"down_blocks.{i}.attentions.{j}",
          f"input_blocks.{idx}.1",
          out_ch,
          c["num_attention_heads"][i],
          c["transformer_layers_per_block"][i],
          c["cross_attention_dim"][i],
          lin,
        )
      idx += 1
    if i < n - 1:
      s.conv(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op", out_ch, out_ch, 3)
      idx += 1

  # Middle: resnet, transformer, resnet.
  mid = boc[-1]
  _unet_resnet(s, "mid_block.resnets.0", "middle_block.0", mid, mid, temb, ss)
  _unet_transformer(
    s,
    "mid_block.attentions.0",
    "middle_block.1",
    mid,
    c["num_attention_heads"][-1],
    c["transformer_layers_per_block"][-1],
    c["cross_attention_dim"][-1],
    lin,
  )
  _unet_resnet(s, "mid_block.resnets.1", "middle_block.2", mid, mid, temb, ss)

  # Up path: diffusers up_blocks[i] is LDM level n-1-i; each block has layers+1 resnets, each its own
  # output_blocks entry; the upsampler sits in the block's last entry, after the attention if any.
  rev_boc = boc[::-1]
  rev_lpb = c["layers_per_block"][::-1]
  rev_tlpb = c["transformer_layers_per_block"][::-1]
  rev_heads = c["num_attention_heads"][::-1]
  rev_cross = c["cross_attention_dim"][::-1]
  idx = 0
  out_ch = rev_boc[0]
  for i, block_type in enumerate(c["up_block_types"]):
    prev_ch, out_ch = out_ch, rev_boc[i]
    in_ch = rev_boc[min(i + 1, n - 1)]
    has_attn = block_type == "CrossAttnUpBlock2D"
    num_layers = rev_lpb[i] + 1
    for j in range(num_layers):
      skip_ch = in_ch if j == num_layers - 1 else out_ch
      res_in = (prev_ch if j == 0 else out_ch) + skip_ch
      _unet_resnet(s, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", res_in, out_ch, temb, ss)
      if has_attn:
        _unet_transformer(
          s,
          f"up_blocks.{i}.attentions.{j}",
          f"output_blocks.{idx}.1",
          out_ch,
          rev_heads[i],
          rev_tlpb[i],
          rev_cross[i],
          lin,
        )
      if j == num_layers - 1 and i < n - 1:
        s.conv(
          f"up_blocks.{i}.upsamplers.0.conv",
          f"output_blocks.{idx}.{2 if has_attn else 1}.conv",
          out_ch,
          out_ch,
          3,
        )
      idx += 1

  s.norm("conv_norm_out", "out.0", boc[0])
  s.conv("conv_out", "out.2", c["out_channels"], boc[0], c["conv_out_kernel"])
  return s.entries


def _vae_resnet(s: _Spec, d: str, l: str, cin: int, cout: int) -> None:  # noqa: E741
  s.norm(f"{d}.norm1", f"{l}.norm1", cin)
  s.conv(f"{d}.conv1", f"{l}.conv1", cout, cin, 3)
  s.norm(f"{d}.norm2", f"{l}.norm2", cout)
  s.conv(f"{d}.conv2", f"{l}.conv2", cout, cout, 3)
  if cin != cout:
    s.conv(f"{d}.conv_shortcut", f"{l}.nin_shortcut", cout, cin, 1)


def _vae_mid(s: _Spec, d: str, l: str, ch: int, attention: bool) -> None:  # noqa: E741
  _vae_resnet(s, f"{d}.resnets.0", f"{l}.block_1", ch, ch)
  if attention:
    a, b = f"{d}.attentions.0", f"{l}.attn_1"
    s.norm(f"{a}.group_norm", f"{b}.norm", ch)
    for dn, ln in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
      s.linear_as_conv(f"{a}.{dn}", f"{b}.{ln}", ch, ch)
  _vae_resnet(s, f"{d}.resnets.1", f"{l}.block_2", ch, ch)


def _vae_entries(c: Mapping[str, Any]) -> list[_Entry]:
  s = _Spec()
  boc = c["block_out_channels"]
  n = len(boc)
  lpb = c["layers_per_block"]
  lat = c["latent_channels"]

  s.conv("encoder.conv_in", "encoder.conv_in", boc[0], c["in_channels"], 3)
  out_ch = boc[0]
  for i in range(n):
    in_ch, out_ch = out_ch, boc[i]
    for j in range(lpb):
      _vae_resnet(
        s,
        f"encoder.down_blocks.{i}.resnets.{j}",
        f"encoder.down.{i}.block.{j}",
        in_ch if j == 0 else out_ch,
        out_ch,
      )
    if i < n - 1:
      s.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", out_ch, out_ch, 3)
  _vae_mid(s, "encoder.mid_block", "encoder.mid", boc[-1], c["mid_attention"])
  s.norm("encoder.conv_norm_out", "encoder.norm_out", boc[-1])
  s.conv("encoder.conv_out", "encoder.conv_out", 2 * lat, boc[-1], 3)

  if c["use_quant_conv"]:
    s.conv("quant_conv", "quant_conv", 2 * lat, 2 * lat, 1)
  if c["use_post_quant_conv"]:
    s.conv("post_quant_conv", "post_quant_conv", lat, lat, 1)

  rev = boc[::-1]
  s.conv("decoder.conv_in", "decoder.conv_in", rev[0], lat, 3)
  _vae_mid(s, "decoder.mid_block", "decoder.mid", rev[0], c["mid_attention"])
  out_ch = rev[0]
  for i in range(n):
    prev_ch, out_ch = out_ch, rev[i]
    level = n - 1 - i
    for j in range(lpb + 1):
      _vae_resnet(
        s,
        f"decoder.up_blocks.{i}.resnets.{j}",
        f"decoder.up.{level}.block.{j}",
        prev_ch if j == 0 else out_ch,
        out_ch,
      )
    if i < n - 1:
      s.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", out_ch, out_ch, 3)
  s.norm("decoder.conv_norm_out", "decoder.norm_out", boc[0])
  s.conv("decoder.conv_out", "decoder.conv_out", c["out_channels"], boc[0], 3)
  return s.entries


# --------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------


def _check_unique(entries: Sequence[_Entry]) -> None:
  d = [e.diffusers_key for e in entries]
  l = [e.ldm_key for e in entries]  # noqa: E741
  if len(set(d)) != len(d) or len(set(l)) != len(l):  # a bug in the builders, never user error
    raise AssertionError("SD single-file key map is not one-to-one")


def _fmt_list(title: str, items: Sequence[str]) -> str:
  lines = [f"{title} ({len(items)}):"]
  lines += [f"  {x}" for x in items[:_MAX_LISTED]]
  if len(items) > _MAX_LISTED:
    lines.append(f"  ... and {len(items) - _MAX_LISTED} more")
  return "\n".join(lines)


def _convert(
  state: Mapping[str, Any],
  entries: Sequence[_Entry],
  *,
  to_ldm: bool,
  what: str,
  summary: str,
  key_prefix: str = "",
  note: str | None = None,
) -> dict[str, np.ndarray]:
  _check_unique(entries)
  src_layout = "diffusers" if to_ldm else "original SD (LDM)"
  by_src = {(e.diffusers_key if to_ldm else e.ldm_key): e for e in entries}

  missing = [k for k in by_src if k not in state]
  unexpected = sorted(k for k in state if k not in by_src)
  mismatched: list[tuple[str, Shape, Shape]] = []
  arrays: dict[str, np.ndarray] = {}
  for k, e in by_src.items():
    if k not in state:
      continue
    arr = np.asarray(state[k])
    want = e.diffusers_shape if to_ldm else e.ldm_shape
    if tuple(arr.shape) != want:
      mismatched.append((k, want, tuple(arr.shape)))
    else:
      arrays[k] = arr

  if missing or unexpected or mismatched:
    parts = [
      f"{what} state dict in {src_layout} layout does not match the key map built from the assumed config.",
      f"Assumed config: {summary}",
    ]
    if note:
      parts.append(note)
    if missing:
      parts.append(_fmt_list("Missing keys", [key_prefix + k for k in missing]))
    if unexpected:
      parts.append(_fmt_list("Unexpected keys", [key_prefix + k for k in unexpected]))
    if mismatched:
      parts.append(
        _fmt_list(
          "Mis-shaped keys",
          [f"{key_prefix}{k}: expected {want}, found {got}" for k, want, got in mismatched],
        )
      )
    if len(missing) + len(unexpected) > 8:
      parts.append("Many keys differ: the config most likely does not describe this checkpoint.")
    err = CheckpointKeyError("\n".join(parts))
    err.missing = [key_prefix + k for k in missing]
    err.unexpected = [key_prefix + k for k in unexpected]
    err.mismatched = [(key_prefix + k, w, g) for k, w, g in mismatched]
    err.assumed_config = summary
    raise err

  out: dict[str, np.ndarray] = {}
  for k, e in by_src.items():
    arr = arrays[k]
    if to_ldm:
      out[e.ldm_key] = arr.reshape(e.ldm_shape) if e.ldm_shape != e.diffusers_shape else arr
    else:
      out[e.diffusers_key] = arr.reshape(e.diffusers_shape) if e.ldm_shape != e.diffusers_shape else arr
  return out


def _shapes(entries: Sequence[_Entry], layout: str) -> dict[str, Shape]:
  if layout == "diffusers":
    return {e.diffusers_key: e.diffusers_shape for e in entries}
  if layout == "ldm":
    return {e.ldm_key: e.ldm_shape for e in entries}
  raise ValueError(f"layout must be 'diffusers' or 'ldm', got {layout!r}")


def unet_key_map(config: Any) -> dict[str, str]:
  """diffusers U-Net key -> LDM key (without the ``model.diffusion_model.`` prefix)."""
  return {e.diffusers_key: e.ldm_key for e in _unet_entries(_unet_config(config))}


def unet_expected_shapes(config: Any, layout: str = "diffusers") -> dict[str, Shape]:
  """Every U-Net parameter the config implies, with its shape, in ``layout`` ('diffusers' or 'ldm')."""
  return _shapes(_unet_entries(_unet_config(config)), layout)


def vae_key_map(config: Any) -> dict[str, str]:
  """diffusers AutoencoderKL key -> LDM key (without the ``first_stage_model.`` prefix)."""
  return {e.diffusers_key: e.ldm_key for e in _vae_entries(_vae_config(config))}


def vae_expected_shapes(config: Any, layout: str = "diffusers") -> dict[str, Shape]:
  """Every AutoencoderKL parameter the config implies, with its shape, in ``layout``."""
  return _shapes(_vae_entries(_vae_config(config)), layout)


def unet_diffusers_to_ldm(state: Mapping[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
  """diffusers UNet2DConditionModel state dict -> LDM keys (no ``model.diffusion_model.`` prefix)."""
  c = _unet_config(config)
  return _convert(state, _unet_entries(c), to_ldm=True, what="UNet", summary=_unet_summary(c))


def unet_ldm_to_diffusers(state: Mapping[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
  """LDM U-Net state dict (keys without ``model.diffusion_model.``) -> diffusers UNet2DConditionModel keys."""
  c = _unet_config(config)
  return _convert(state, _unet_entries(c), to_ldm=False, what="UNet", summary=_unet_summary(c))


def vae_diffusers_to_ldm(state: Mapping[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
  """diffusers AutoencoderKL state dict -> LDM keys (no ``first_stage_model.`` prefix).

  The mid-block attention q/k/v/proj_out weights become 1x1 conv weights [C, C, 1, 1].
  """
  c = _vae_config(config)
  return _convert(state, _vae_entries(c), to_ldm=True, what="VAE", summary=_vae_summary(c))


def vae_ldm_to_diffusers(state: Mapping[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
  """LDM VAE state dict (keys without ``first_stage_model.``) -> diffusers AutoencoderKL keys."""
  c = _vae_config(config)
  return _convert(state, _vae_entries(c), to_ldm=False, what="VAE", summary=_vae_summary(c))


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------


def save_single_file(
  path: str | os.PathLike,
  unet_state: Mapping[str, np.ndarray] | None = None,
  unet_config: Any = None,
  vae_state: Mapping[str, np.ndarray] | None = None,
  vae_config: Any = None,
  metadata: Mapping[str, str] | None = None,
) -> None:
  """Write diffusers-layout U-Net and/or VAE weights as one original-layout ``.safetensors`` file.

  Keys get the ``model.diffusion_model.`` / ``first_stage_model.`` prefixes. Everything is
  converted (and validated) before anything is written; the file is written to a temporary
  name in the same directory and renamed into place, so ``path`` is never left half-written.
  """
  if unet_state is None and vae_state is None:
    raise ValueError("save_single_file needs unet_state and/or vae_state")
  if (unet_state is None) != (unet_config is None):
    raise ValueError("unet_state and unet_config must be given together")
  if (vae_state is None) != (vae_config is None):
    raise ValueError("vae_state and vae_config must be given together")

  tensors: dict[str, np.ndarray] = {}
  if unet_state is not None:
    for k, v in unet_diffusers_to_ldm(unet_state, unet_config).items():
      tensors[LDM_UNET_PREFIX + k] = np.ascontiguousarray(v)
  if vae_state is not None:
    for k, v in vae_diffusers_to_ldm(vae_state, vae_config).items():
      tensors[LDM_VAE_PREFIX + k] = np.ascontiguousarray(v)

  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = str(atomic.temp_file(os.path.join(directory, os.path.basename(path))))  # 0666 minus the umask, not 0600
  try:
    save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
    atomic.default_mode(tmp)  # safetensors writes 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _torch_to_numpy(t: Any) -> np.ndarray:
  import torch  # lazy: only reached for .ckpt / .pt pickles

  if not isinstance(t, torch.Tensor):
    return np.asarray(t)
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    import ml_dtypes

    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


class _Reader:
  """Uniform key listing + lazy tensor access for .safetensors and torch pickles."""

  def __init__(self, path: str) -> None:
    self.path = path
    self._st = None
    self._dict: Mapping[str, Any] | None = None
    if path.endswith(".safetensors"):
      try:  # bf16 tensors need ml_dtypes registered with numpy
        import ml_dtypes  # noqa: F401
      except ImportError:
        pass
      self._st = safe_open(path, framework="np")
      self._keys = list(self._st.keys())
    else:
      import torch  # lazy: only for pickled checkpoints

      obj = torch.load(path, map_location="cpu", weights_only=True)
      while isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
      if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
      self._dict = obj
      self._keys = [k for k in obj if isinstance(k, str)]

  def keys(self) -> list[str]:
    return self._keys

  def get(self, key: str) -> np.ndarray:
    if self._st is not None:
      return self._st.get_tensor(key)
    return _torch_to_numpy(self._dict[key])


def load_single_file(
  path: str | os.PathLike,
  unet_config: Any = None,
  vae_config: Any = None,
) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
  """Read an original-layout SD checkpoint and return ``(unet_state, vae_state)`` in diffusers layout.

  ``path`` is a ``.safetensors`` file or a torch pickle (``.ckpt`` / ``.pt`` / ``.pth``, read with
  ``weights_only=True``; a top-level ``"state_dict"`` is unwrapped). The U-Net is read from
  ``model.diffusion_model.*`` when ``unet_config`` is given, the VAE from ``first_stage_model.*``
  when ``vae_config`` is given (or, for a standalone VAE file with no such prefix, from its
  top-level ``encoder.* / decoder.* / quant_conv.* / post_quant_conv.*``). A part whose config is
  None is returned as None. Keys outside those namespaces (``cond_stage_model.*``,
  ``model_ema.*``, ...) are ignored; inside them every key must map and have the expected shape,
  otherwise :class:`CheckpointKeyError` is raised.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointReadError(f"no checkpoint file at {path}")
  try:
    reader = _Reader(path)
  except ValueError:
    raise
  except Exception as e:  # safetensors / pickle errors for truncated or foreign files
    raise CheckpointReadError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
  keys = reader.keys()

  unet = vae = None
  if unet_config is not None:
    c = _unet_config(unet_config)
    sub = {k[len(LDM_UNET_PREFIX) :]: k for k in keys if k.startswith(LDM_UNET_PREFIX)}
    note = None if sub else f"{path} has no keys starting with {LDM_UNET_PREFIX!r}."
    state = {k: reader.get(full) for k, full in sub.items()}
    unet = _convert(
      state,
      _unet_entries(c),
      to_ldm=False,
      what="UNet",
      summary=_unet_summary(c),
      key_prefix=LDM_UNET_PREFIX,
      note=note,
    )
  if vae_config is not None:
    c = _vae_config(vae_config)
    prefix = LDM_VAE_PREFIX
    sub = {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
    note = None
    if not sub:
      bare = {k: k for k in keys if k.startswith(_BARE_VAE_PREFIXES)}
      if "encoder.conv_in.weight" in bare:
        prefix, sub = "", bare
      else:
        note = f"{path} has no keys starting with {LDM_VAE_PREFIX!r}."
    state = {k: reader.get(full) for k, full in sub.items()}
    vae = _convert(
      state, _vae_entries(c), to_ldm=False, what="VAE", summary=_vae_summary(c), key_prefix=prefix, note=note
    )
  return unet, vae


# mimajax models
# --------------------------------------------------------------------------------------


def save_models(path: str | os.PathLike, unet=None, vae=None) -> None:
  """Write mimajax U-Net and/or VAE models as one original-layout SD ``.safetensors`` file."""
  from mimajax.convert import diffusers_format as df

  save_single_file(
    path,
    unet_state=df.unet_to_torch_state(unet) if unet is not None else None,
    unet_config=unet.config.to_diffusers() if unet is not None else None,
    vae_state=df.vae_to_torch_state(vae) if vae is not None else None,
    vae_config=vae.config.to_diffusers() if vae is not None else None,
  )


def load_models(path: str | os.PathLike, unet_config=None, vae_config=None, *, dtype=None, attention_impl=None):
  """``(unet, vae)`` mimajax models from an original-layout SD checkpoint; None for a part not asked for.

  ``unet_config`` / ``vae_config`` are :class:`UNetConfig` / :class:`VAEConfig` (single files carry
  no architecture, so it has to be given).
  """
  import jax.numpy as jnp

  from mimajax.convert import diffusers_format as df

  unet_state, vae_state = load_single_file(
    path,
    unet_config.to_diffusers() if unet_config is not None else None,
    vae_config.to_diffusers() if vae_config is not None else None,
  )
  kw = dict(dtype=dtype or jnp.float32, attention_impl=attention_impl, assumed=f"the config given for {path}")
  unet = df.unet_from_torch_state(unet_config, unet_state, **kw) if unet_state is not None else None
  vae = df.vae_from_torch_state(vae_config, vae_state, **kw) if vae_state is not None else None
  return unet, vae
