"""MIMAFace in PyTorch: an exported model (`mimajax export`) run with diffusers, transformers and our MIA.

    pipe = MIMAFacePipeline.from_pretrained("export_dir")
    latents = pipe(source, motion, render_latents, noise, cond_latents=previous, mask=mask)
    frames = pipe.decode(latents)  # (B, 3, F, H, W) in [0, 1]

PyTorch layouts throughout: images (B, 3, [F,] H, W) in [0, 1], latents (B, 4, [F,] h, w) (diffusers' video
layout), mask (B, 1, [F,] h, w), coefficients (B, [F,] 257 | 261). The U-Net input is the channel concatenation
[noisy 4 | render latents 4 | ICA latents 4 | mask 1] (docs/export_layout.md); CFG runs [unconditional |
conditional] in one batch with a zero appearance context for the unconditional half. The same computation as
`mimajax.mimaface.sampling.ClipSampler`; `mimajax parity --component mimaface` checks the two agree.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mimajax.mimaface.mia import MIAConfig
from mimajax.mimaface.pytorch.mia import build_mia
from mimajax.models.clip_vision import CLIP_MEAN, CLIP_STD

CONFIG_FILE, MIA_WEIGHTS = "mimaface_config.json", "mia.safetensors"


def _strict(loaded, where):
  """The model of `from_pretrained(..., output_loading_info=True)`, refusing any missing or unexpected key."""
  model, info = loaded
  problems = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
  if problems:
    raise ValueError(f"{where} does not match its config (nothing should be initialised at random): {problems}")
  return model


class MIMAFacePipeline:
  """CLIP image encoder + MIA + the 13-channel (motion) U-Net + VAE + DDIM / Euler schedulers."""

  def __init__(self, image_encoder, mia, unet, vae, scheduler_config, config: dict):
    self.image_encoder, self.mia, self.unet, self.vae = image_encoder, mia, unet, vae
    self.scheduler_config = dict(scheduler_config)
    self.config = config
    self.inference = dict(config.get("inference", {}))
    self.video = config["motion"] is not None

  @classmethod
  def from_pretrained(cls, folder, torch_dtype=torch.float32, device="cpu") -> "MIMAFacePipeline":
    """Loads every part of an export folder strictly (a missing or unexpected key raises)."""
    import diffusers
    import transformers

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    clip_cls = getattr(
      transformers, json.loads((folder / "image_encoder" / "config.json").read_text())["architectures"][0]
    )
    unet_cls = getattr(diffusers, json.loads((folder / "unet" / "config.json").read_text())["_class_name"])
    # Without accelerate diffusers falls back to (and warns about) the plain load; say so up front.
    kw = dict(torch_dtype=torch_dtype, low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    image_encoder = _strict(clip_cls.from_pretrained(str(folder / "image_encoder"), dtype=torch_dtype,
                                                     output_loading_info=True), folder / "image_encoder")  # fmt: skip
    unet = _strict(unet_cls.from_pretrained(str(folder / "unet"), output_loading_info=True, **kw), folder / "unet")
    vae = _strict(diffusers.AutoencoderKL.from_pretrained(str(folder / "vae"), output_loading_info=True, **kw),
                  folder / "vae")  # fmt: skip
    mia_config = json.loads((folder / "mia" / "config.json").read_text())
    mia = build_mia(MIAConfig(**{f.name: mia_config[f.name] for f in dataclasses.fields(MIAConfig)}))
    mia.load_state_dict(load_file(str(folder / "mia" / MIA_WEIGHTS)), strict=True)
    scheduler_config = diffusers.DDIMScheduler.load_config(str(folder / "scheduler"))
    parts = (image_encoder.eval(), mia.to(torch_dtype).eval(), unet.eval(), vae.eval())
    return cls(*(p.to(device) for p in parts), scheduler_config, config)

  @property
  def device(self) -> torch.device:
    return self.unet.device

  # ------------------------------------------------------------------------------------------- conditions

  @torch.no_grad()
  def clip_features(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """source (B, 3, S, S) in [0, 1] -> (CLIP last_hidden_state (B, 1 + P, C), pooled class token e_id (B, C))."""
    mean, std = (
      torch.tensor(v, dtype=source.dtype, device=source.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD)
    )
    # transformers < 5 wraps the tower as `.vision_model` in both classes; >= 5 only in the one with projection.
    tower = getattr(self.image_encoder, "vision_model", self.image_encoder)
    out = tower(pixel_values=(source - mean) / std)
    return out.last_hidden_state, out.pooler_output

  @torch.no_grad()
  def encode_appearance(self, source: torch.Tensor, motion: torch.Tensor, face_features=None) -> torch.Tensor:
    """source (B, 3, S, S) in [0, 1], motion (B, [F,] 257|261) -> context (B, T, D), or per frame (B, F, T, D)."""
    hidden, e_id = self.clip_features(source)
    if self.mia.cfg.variant == "paper":
      return self.mia(hidden[:, 1:], e_id, motion)
    if face_features is None:
      raise ValueError("the release variant's MIA needs face_features (B, 25088): face-recognition features")
    return self.mia(hidden, face_features, motion)

  @torch.no_grad()
  def encode(self, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, [F,] H, W) in [0, 1] -> scaled latents (B, 4, [F,] h, w) (the posterior mean, as training)."""
    flat, unflat = self._frames(images)
    cfg = self.vae.config
    z = self.vae.encode(flat * 2 - 1).latent_dist.mean
    return unflat((z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor)

  @torch.no_grad()
  def decode(self, latents: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Scaled latents (B, 4, [F,] h, w) -> images (B, 3, [F,] H, W) in [0, 1] (clipped unless clip=False)."""
    flat, unflat = self._frames(latents)
    cfg = self.vae.config
    images = self.vae.decode(flat / cfg.scaling_factor + (cfg.shift_factor or 0.0)).sample * 0.5 + 0.5
    return unflat(images.clamp(0, 1) if clip else images)

  @staticmethod
  def _frames(x: torch.Tensor):
    """(B, C, F, H, W) -> (B*F, C, H, W) and the inverse; 4-d tensors pass through."""
    if x.ndim == 4:
      return x, lambda y: y
    b, _, f = x.shape[:3]
    return x.transpose(1, 2).flatten(0, 1), lambda y: y.unflatten(0, (b, f)).transpose(1, 2)

  # ------------------------------------------------------------------------------------------- denoising

  @torch.no_grad()
  def predict(self, noisy, timestep, context, render_latents, cond_latents=None, mask=None) -> torch.Tensor:
    """The U-Net's output for noisy latents (B, 4, [F,] h, w); ICA inputs default to none."""
    if cond_latents is None:
      cond_latents = torch.zeros_like(noisy)
    if mask is None:
      mask = torch.zeros_like(noisy[:, :1])
    sample = torch.cat([noisy, render_latents, cond_latents, mask.to(noisy.dtype)], dim=1)
    if self.video != (sample.ndim == 5):
      raise ValueError(f"a {'video' if self.video else 'image'} U-Net got latents of shape {tuple(noisy.shape)}")
    if self.video:  # diffusers' UNetMotionModel wants one context row per frame, frame-major within each clip
      frames = sample.shape[2]
      context = context.flatten(0, 1) if context.ndim == 4 else context.repeat_interleave(frames, dim=0)
    return self.unet(sample, timestep, encoder_hidden_states=context).sample

  def make_scheduler(self, name: str):
    """A fresh DDIM or Euler scheduler on the exported noise schedule."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    if name not in classes:
      raise ValueError(f"scheduler {name!r} unknown; expected one of {sorted(classes)}")
    return classes[name].from_config(self.scheduler_config)

  @torch.no_grad()
  def __call__(
    self,
    source: torch.Tensor,
    motion: torch.Tensor,
    render_latents: torch.Tensor,
    noise: torch.Tensor,
    cond_latents: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    face_features: torch.Tensor | None = None,
  ) -> torch.Tensor:
    """Denoised latents (B, 4, [F,] h, w) of one clip from unit-variance `noise`; defaults from the export."""
    steps = num_inference_steps or self.inference.get("num_inference_steps", 25)
    scale = self.inference.get("guidance_scale", 3.5) if guidance_scale is None else guidance_scale
    sched = self.make_scheduler(scheduler or self.inference.get("scheduler", "ddim"))
    sched.set_timesteps(steps, device=noise.device)
    context = self.encode_appearance(source, motion, face_features)
    guided = scale != 1.0
    if guided:  # [unconditional | conditional]: training drops the appearance condition by zeroing it
      context = torch.cat([torch.zeros_like(context), context])
      render_latents, cond_latents, mask = (
        None if x is None else torch.cat([x, x]) for x in (render_latents, cond_latents, mask)
      )
    x = noise * sched.init_noise_sigma
    step_kw = dict(eta=eta, generator=generator) if eta else {}
    for t in sched.timesteps:
      inp = sched.scale_model_input(x, t)
      out = self.predict(torch.cat([inp, inp]) if guided else inp, t, context, render_latents, cond_latents, mask)
      if guided:
        uncond, cond = out.chunk(2)
        out = uncond + scale * (cond - uncond)
      x = sched.step(out, t, x, **step_kw).prev_sample
    return x
