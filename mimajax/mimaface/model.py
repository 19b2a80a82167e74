"""MIMAFace (Han et al. 2024), assembled: CLIP + MIA appearance, the 13-channel U-Net, and its training objective.

Stage 1 (images, `motion=None`): the SD U-Net denoises one frame conditioned on the render latent
(concatenated at the input) and on the MIA appearance tokens (cross-attention).
Stage 2 (clips, `motion` set): the same U-Net runs per frame with AnimateDiff motion modules, and
ICA feeds the first k frames' ground-truth latents (plus N(0, 0.1^2) noise) and a mask through
the widened conv_in (W_cond).

Two variants (`MIAConfig.variant`): "paper" (the paper's MIA with the identity contrastive loss)
and "release" (the official PyTorch release's post-fuse module, for importing its weights).

A batch (see `training_loss`) holds, with F frames in stage 2 and none in stage 1:
  source      (B, S, S, 3) in [0, 1]: the source portrait at CLIP resolution (S = clip.image_size, 224)
  motion      (B, [F,] 257 | 261) driving 3DMM coefficients (Deep3DFaceRecon layout, + gaze)
  latents     (B, [F,] h, w, 4) VAE latents of the target frames (already scaled)
  render_latents (B, [F,] h, w, 4) VAE latents of the rendered 3DMM faces I_R
  identity    (B,) int identity labels (for the contrastive loss and the memory bank)
  face_features (B, 25088) face-recognition features (release variant only)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax.diffusion import schedulers
from mimajax.mimaface import augment, ica, losses
from mimajax.mimaface.memory_bank import MemoryBank
from mimajax.mimaface.mia import MIAConfig, build_mia, drop_condition
from mimajax.models.clip_vision import CLIP_MEAN, CLIP_STD, CLIP_VIT_L14, CLIPVisionConfig, CLIPVisionEncoder
from mimajax.models.unet2d import UNet2DConditionModel
from mimajax.models.unet_config import UNetConfig
from mimajax.models.unet_motion import MotionConfig, UNetMotionConfig, UNetMotionModel

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MIMAFaceConfig:
  """The whole model and its objective; defaults are the paper's (SD1.5, CLIP ViT-L/14)."""

  unet: UNetConfig = UNetConfig(in_channels=ica.INPUT_CHANNELS)
  clip: CLIPVisionConfig = CLIP_VIT_L14
  mia: MIAConfig = MIAConfig()
  motion: MotionConfig | None = None  # None: stage 1 (images); set: stage 2 (clips)
  cfg_dropout: float = 0.1  # fraction of samples trained without appearance condition (for CFG)
  cfg_dropout_scope: str = "sample"  # "sample": per sample (ours); "batch": the whole batch at once (the release)
  identity_loss_weight: float = 0.1  # lambda of L_id (paper variant); 0 disables it
  identity_temperature: float = 1.0  # the paper's eq. 2 has none
  ica_sigma: float = 0.1  # std of the noise on ICA's ground-truth conditioning latents
  ica_max_frames: int | None = None  # k ~ U{0..this}; None: F // 4 (paper)
  ica_schedule: str = "paper"  # "paper": k ~ U{0..F/4} per sample (eq. 3); "release": 0 or U{1..4}, per batch
  clean_condition_prob: float = 0.0  # stage 1: P(the ICA channels carry the clean target latents, mask 1); release 0.01
  min_snr_gamma: float | None = None  # the release trains with 5.0
  augment: augment.PhotometricConfig = augment.PhotometricConfig()

  def __post_init__(self):
    if self.cfg_dropout_scope not in ("sample", "batch"):
      raise ValueError(f"cfg_dropout_scope={self.cfg_dropout_scope!r}; expected 'sample' or 'batch'")
    if self.ica_schedule not in ica.ICA_SCHEDULES:
      raise ValueError(f"ica_schedule={self.ica_schedule!r}; expected one of {ica.ICA_SCHEDULES}")
    if not 0 <= self.clean_condition_prob <= 1:
      raise ValueError(f"clean_condition_prob={self.clean_condition_prob} must be in [0, 1]")
    if self.unet.in_channels != ica.INPUT_CHANNELS:
      raise ValueError(
        f"MIMAFace's U-Net takes {ica.INPUT_CHANNELS} input channels [noisy 4 | render 4 | ICA latents 4 | mask 1]; "
        f"the config has in_channels={self.unet.in_channels} (widen an SD checkpoint with ica.widen_unet_input)"
      )
    if self.unet.cross_attention_dim != self.mia.cross_attention_dim:
      raise ValueError(
        f"MIA outputs {self.mia.cross_attention_dim}-dim tokens but the U-Net's cross_attention_dim is "
        f"{self.unet.cross_attention_dim}"
      )
    clip_width = self.clip.hidden_size
    if self.mia.clip_dim != clip_width:
      raise ValueError(f"MIAConfig.clip_dim={self.mia.clip_dim} != the CLIP encoder's hidden_size={clip_width}")
    if self.mia.variant == "release" and self.mia.clip_tokens != self.clip.num_positions:
      raise ValueError(
        f"release MIA expects {self.mia.clip_tokens} CLIP tokens; this CLIP has {self.clip.num_positions}"
      )

  @property
  def video(self) -> bool:
    return self.motion is not None

  @property
  def unet_config(self) -> UNetConfig:
    return UNetMotionConfig.from_unet(self.unet, self.motion) if self.video else self.unet


@dataclasses.dataclass
class Appearance:
  """The appearance condition: U-Net context tokens, and e_id for the identity loss."""

  context: jax.Array  # (B, T, 768), or per frame (B, F, T, 768) for the paper variant on clips
  e_id: jax.Array  # (B, clip_dim) CLIP class token (after post-LayerNorm)


class MIMAFace(nnx.Module):
  """CLIP appearance encoder + MIA + the 13-channel (video) U-Net."""

  def __init__(self, config: MIMAFaceConfig, *, dtype: Dtype = jnp.float32, attention_impl: str | None = None,
               rngs: nnx.Rngs):  # fmt: skip
    self.config = config
    kw = dict(dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    self.clip = CLIPVisionEncoder(config.clip, **kw)
    self.mia = build_mia(config.mia, implementation=attention_impl, dtype=dtype, rngs=rngs)
    unet_cls = UNetMotionModel if config.video else UNet2DConditionModel
    self.unet = unet_cls(config.unet_config, **kw)

  def encode_appearance(self, source: jax.Array, motion: jax.Array | Mapping[str, jax.Array],
                        face_features: jax.Array | None = None) -> Appearance:  # fmt: skip
    """source (B, 224, 224, 3) in [0, 1]; motion (B, [F,] 257|261) or named groups -> Appearance."""
    out = self.clip(normalize_for_clip(source))
    if self.config.mia.variant == "paper":
      return Appearance(self.mia(out.e_tex, out.e_id, motion), out.e_id)
    if face_features is None:
      raise ValueError("the release variant's MIA needs face_features (B, 25088): face-recognition features")
    return Appearance(self.mia(out.last_hidden_state, face_features, motion), out.e_id)

  def predict(self, noisy: jax.Array, timesteps: jax.Array, context: jax.Array, render_latents: jax.Array,
              cond_latents: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """The U-Net's epsilon (or v) prediction for noisy latents (B, [F,] h, w, 4); ICA inputs default to none."""
    if cond_latents is None:
      cond_latents = jnp.zeros_like(noisy)
    if mask is None:
      mask = jnp.zeros(noisy.shape[:-1] + (1,), noisy.dtype)
    x = ica.unet_input(noisy, render_latents, cond_latents, mask)
    if self.config.video != (x.ndim == 5):
      raise ValueError(
        f"a {'stage-2 (video)' if self.config.video else 'stage-1 (image)'} model got latents of shape {noisy.shape}"
      )
    return self.unet(x, timesteps, context)


def normalize_for_clip(images: jax.Array) -> jax.Array:
  """[0, 1] RGB -> CLIP's normalised input."""
  return (images - jnp.asarray(CLIP_MEAN, images.dtype)) / jnp.asarray(CLIP_STD, images.dtype)


# ----------------------------------------------------------------------------- training objective


def training_loss(
  model: MIMAFace,
  batch: Mapping[str, jax.Array],
  rng: jax.Array,
  schedule: schedulers.NoiseSchedule,
  bank: MemoryBank | None = None,
  *,
  identity_loss: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Denoising loss (+ lambda * identity contrastive loss) for one batch; (loss, aux) with aux["e_id"] for the bank.

  Per sample: t ~ U{0..T-1}; x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; the appearance condition is
  zeroed with probability cfg_dropout (per sample, or for the whole batch as the release does); in stage 2 the ICA
  conditioning follows eq. 3-4 (or the release's k), in stage 1 it carries the clean target with probability
  clean_condition_prob (the release's 1%); the target is eps or v by the schedule's prediction type, optionally
  min-SNR-gamma weighted. identity_loss=False skips L_id (nothing it would train is trainable: stage 2).
  """
  cfg = model.config
  latents = batch["latents"]
  video = latents.ndim == 5
  if video != cfg.video:
    raise ValueError(f"{'stage-2' if cfg.video else 'stage-1'} training got latents of shape {latents.shape}")
  b = latents.shape[0]
  t_rng, noise_rng, drop_rng, ica_rng, aug_rng = jax.random.split(rng, 5)
  t = jax.random.randint(t_rng, (b,), 0, schedule.num_train_timesteps)
  noise = jax.random.normal(noise_rng, latents.shape, latents.dtype)
  noisy = schedulers.add_noise(schedule, latents, noise, t)
  target = schedulers.training_target(schedule, latents, noise, t)

  appearance = model.encode_appearance(batch["source"], batch["motion"], batch.get("face_features"))
  context = drop_condition(drop_rng, appearance.context, cfg.cfg_dropout, per_batch=cfg.cfg_dropout_scope == "batch")
  cond, mask = None, None
  if video:
    cond, mask, _ = ica.ica_training_condition(ica_rng, latents, sigma=cfg.ica_sigma, max_frames=cfg.ica_max_frames,
                                               schedule=cfg.ica_schedule)  # fmt: skip
  elif cfg.clean_condition_prob:
    cond, mask = ica.clean_condition(ica_rng, latents, cfg.clean_condition_prob)
  pred = model.predict(noisy, t, context, batch["render_latents"], cond, mask)
  weights = schedulers.min_snr_weight(schedule, t, cfg.min_snr_gamma) if cfg.min_snr_gamma else None
  diffusion = losses.diffusion_loss(pred, target, weights)

  aux = {"diffusion_loss": diffusion, "e_id": jax.lax.stop_gradient(appearance.e_id)}
  loss = diffusion
  if identity_loss and cfg.identity_loss_weight and cfg.mia.variant == "paper":
    augmented = augment.photometric_augment(aug_rng, batch["source"], cfg.augment)
    positive = model.clip(normalize_for_clip(augmented)).e_id
    if bank is None:
      tokens, labels, valid = (
        jnp.zeros((1, appearance.e_id.shape[-1])),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1,), bool),
      )
    else:
      tokens, labels, valid = bank.tokens, bank.labels, bank.valid
    identity = losses.identity_contrastive_loss(
      appearance.e_id, positive, tokens, labels, valid, batch["identity"], temperature=cfg.identity_temperature
    )
    aux["identity_loss"] = identity
    loss = loss + cfg.identity_loss_weight * identity
  aux["loss"] = loss
  return loss, aux
