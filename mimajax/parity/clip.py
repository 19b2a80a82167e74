"""transformers' CLIP vision model against mimajax's `CLIPVisionEncoder`, through the real folder format.

torch and transformers are imported only inside these functions.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np

from mimajax.convert.clip_format import expects_projection, load_clip_vision
from mimajax.convert.diffusers_format import read_config
from mimajax.models.clip_vision import CLIP_TINY, CLIP_VIT_L14
from mimajax.parity.common import rel_err

SIZES = {"tiny": CLIP_TINY, "sd15": CLIP_VIT_L14, "vitl14": CLIP_VIT_L14}


def _torch_reference(folder: Path):
  """The PyTorch model of a folder as pixel_values -> (last, hidden_states, pooler, image_embeds | None)."""
  import torch
  from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

  raw = read_config(folder)
  if "vision_config" in raw:
    full = CLIPModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    tower, projection = full.vision_model, full.visual_projection
  elif expects_projection(raw) is False:
    tower, projection = CLIPVisionModel.from_pretrained(str(folder), dtype=torch.float32).eval(), None
  else:
    with_proj = CLIPVisionModelWithProjection.from_pretrained(str(folder), dtype=torch.float32).eval()
    tower, projection = with_proj.vision_model, with_proj.visual_projection

  def run(pixel_values: np.ndarray):
    with torch.no_grad():
      out = tower(pixel_values=torch.from_numpy(pixel_values), output_hidden_states=True)
      embeds = projection(out.pooler_output).numpy() if projection is not None else None
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states], out.pooler_output.numpy(), embeds

  return run


def clip_parity(
  size: str = "tiny",
  pretrained: str | None = None,
  seed: int = 0,
  batch: int = 2,
  log: Callable[[str], None] = print,
) -> float:
  """transformers' CLIP vision model vs mimajax: every hidden state, pooled class token (e_id), image_embeds.

  Random weights (every tensor perturbed) saved with save_pretrained, or a local `pretrained` folder
  (CLIPVisionModel[WithProjection] or CLIPModel). Returns the largest relative L2 error.
  """
  import torch
  from transformers import CLIPVisionConfig as TorchConfig
  from transformers import CLIPVisionModelWithProjection

  if size not in SIZES:
    raise ValueError(f"clip parity size {size!r} unknown; expected one of {sorted(SIZES)}")
  with tempfile.TemporaryDirectory() as tmp:
    if pretrained:
      folder = Path(pretrained)
    else:
      torch.manual_seed(seed)
      ref = CLIPVisionModelWithProjection(TorchConfig(**SIZES[size].to_transformers()))
      gen = torch.Generator().manual_seed(seed)
      with torch.no_grad():
        for p in ref.parameters():  # noise on every tensor so LayerNorm ones / bias zeros are exercised
          p.add_(torch.randn(p.shape, generator=gen) * 0.02)
      folder = Path(tmp) / "clip"
      ref.save_pretrained(str(folder))
    reference = _torch_reference(folder)
    ours = load_clip_vision(folder)
  cfg = ours.config
  pixels = np.random.default_rng(seed).standard_normal((batch, cfg.num_channels, cfg.image_size, cfg.image_size))
  pixels = pixels.astype(np.float32)
  last, hidden, pooled, embeds = reference(pixels)
  got = ours(jnp.asarray(np.moveaxis(pixels, 1, -1)))
  tag = f"clip[{size}{', pretrained' if pretrained else ''}]"
  errors = {"last_hidden_state": rel_err(got.last_hidden_state, last)}
  if len(got.hidden_states) != len(hidden):
    raise AssertionError(f"{tag}: {len(got.hidden_states)} hidden states vs transformers' {len(hidden)}")
  for i, (a, b) in enumerate(zip(got.hidden_states, hidden)):
    errors[f"hidden_states[{i}]"] = rel_err(a, b)
  errors["e_id (pooler_output)"] = rel_err(got.e_id, pooled)
  if embeds is not None:
    errors["image_embeds"] = rel_err(got.image_embeds, embeds)
  for name, err in errors.items():
    log(f"{tag} {name}: rel_err={err:.3e}")
  worst = max(errors.values())
  log(f"{tag} max rel_err={worst:.3e}")
  return worst
