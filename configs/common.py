"""Pieces every experiment config shares: model sizes, mesh, logical-axis rules.

Configs are Python files with `get_config(arg)`; single values are overridden on the command
line, e.g. `--config.model.unet.block_out_channels='(32, 64)'`.
"""

import dataclasses

import ml_collections

from mimajax.mimaface.mia import MIAConfig
from mimajax.models.clip_vision import CLIP_TINY, CLIP_VIT_L14
from mimajax.models.unet_config import UNetConfig
from mimajax.models.unet_motion import MotionConfig
from mimajax.models.vae import VAEConfig


def dataclass_config(dc) -> ml_collections.ConfigDict:
  """A ConfigDict with a dataclass instance's fields (tuples stay tuples)."""
  return ml_collections.ConfigDict({f.name: getattr(dc, f.name) for f in dataclasses.fields(dc)})


def sd15_unet() -> ml_collections.ConfigDict:
  """SD1.5's U-Net (runwayml/stable-diffusion-v1-5 unet/config.json)."""
  return dataclass_config(UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8))


def sd15_vae() -> ml_collections.ConfigDict:
  """SD1.5's VAE (vae/config.json; the same for sd-vae-ft-mse)."""
  return dataclass_config(VAEConfig())


def tiny_unet() -> ml_collections.ConfigDict:
  """A CPU-sized U-Net with every structural feature of SD1.5 (cross-attn and plain blocks, 2 layers)."""
  return dataclass_config(
    UNetConfig(
      sample_size=16,
      block_out_channels=(32, 64),
      layers_per_block=2,
      norm_num_groups=8,
      cross_attention_dim=32,
      attention_head_dim=4,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
  )


def tiny_vae() -> ml_collections.ConfigDict:
  return dataclass_config(VAEConfig(sample_size=64, block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1))


def noise_schedule() -> ml_collections.ConfigDict:
  """SD1.x's DDPM training schedule."""
  return ml_collections.ConfigDict(
    dict(
      num_train_timesteps=1000,
      beta_start=0.00085,
      beta_end=0.012,
      beta_schedule="scaled_linear",
      prediction_type="epsilon",
    )
  )


# Logical parameter axes -> mesh axes. Activations are data-parallel over ("data", "fsdp").
# Parameters are FSDP-sharded on their larger feature axis; "tensor" splits attention heads and MLPs.
UNET_AXIS_RULES = (
  ("embed", "fsdp"),
  ("embed_out", None),
  ("heads", "tensor"),
  ("mlp", "tensor"),
  ("conv_in", None),
  ("conv_out", "fsdp"),
  ("conv_height", None),
  ("conv_width", None),
  ("norm", None),
)
# CLIP ViT-L/14 (304M) and the MIA adapter: FSDP on the embedding axis like the U-Net; the position
# table is small and replicated.
CLIP_AXIS_RULES = UNET_AXIS_RULES + (("positions", None),)
# The VAE is small (84M) and activation-heavy: replicate its parameters, shard only the batch.
VAE_AXIS_RULES = tuple((name, None) for name, _ in UNET_AXIS_RULES)


def clip_config(size: str) -> ml_collections.ConfigDict:
  """CLIP ViT-L/14 (the paper's appearance encoder) or a tiny ViT with the same structure."""
  if size == "sd15":
    return dataclass_config(CLIP_VIT_L14)
  return dataclass_config(CLIP_TINY)


def mia_config(size: str, variant: str = "paper") -> ml_collections.ConfigDict:
  """MIA sizes: ViT-L/14 -> SD1.5's 768-dim context, or tiny."""
  if size == "sd15":
    return dataclass_config(MIAConfig(variant=variant))
  return dataclass_config(
    MIAConfig(
      variant=variant,
      clip_dim=32,
      cross_attention_dim=32,
      num_heads=4,
      adapter_layers=2,
      face_recognition_dim=50,
      clip_tokens=17,
      release_layers=2,
    )
  )


def motion_config(size: str) -> ml_collections.ConfigDict:
  """AnimateDiff v3 motion modules (8 heads, 32 frames, no mid block); 4 heads when tiny."""
  return dataclass_config(MotionConfig(num_attention_heads=8 if size == "sd15" else 4))


def model_config(size: str) -> ml_collections.ConfigDict:
  """config.model for `size` in {"tiny", "sd15"}."""
  if size not in ("tiny", "sd15"):
    raise ValueError(f"unknown model size {size!r}; expected 'tiny' or 'sd15'")
  return ml_collections.ConfigDict(
    dict(
      unet=tiny_unet() if size == "tiny" else sd15_unet(),
      vae=tiny_vae() if size == "tiny" else sd15_vae(),
      clip=clip_config(size),
      mia=mia_config(size),
      motion=motion_config(size),
      # "blockwise": memory-efficient, fastest on CPU; "xla": plain fused attention (GPU/TPU fp32);
      # "cudnn": flash attention on NVIDIA GPUs (bf16/fp16 only).
      attention_impl="blockwise" if size == "tiny" else "xla",
      dtype="float32",  # compute dtype; parameters are always fp32
      pretrained="",  # local diffusers pipeline folder (unet/, vae/) to start from
      vae_from="",  # a VAE-stage workdir (its vae/) or a diffusers VAE folder: the frozen VAE of stage 1
    )
  )


# Trainable parameter sets (regexes over paths like "unet/down_blocks/0/resnets/1/conv1/kernel").
# Stage 1 (images): the U-Net, the appearance encoder and MIA. Stage 2 (clips): the conditioning
# input conv (W_cond, in conv_in) and the motion modules; the release also tunes MIA and CLIP's last two layers.
STAGE1_TRAINABLE = ("^unet/", "^clip/", "^mia/")
STAGE2_TRAINABLE = ("^unet/conv_in/", "/motion_modules/")
RELEASE_STAGE2_TRAINABLE = STAGE2_TRAINABLE + ("^mia/", r"^clip/encoder/layers/(22|23)/")


def data_config(stage: int) -> ml_collections.ConfigDict:
  """config.data: the prepared shards and how clips are drawn from them."""
  return ml_collections.ConfigDict(
    dict(
      path="data/demo",  # a `mimajax prepare` output folder (manifest.json + shards)
      num_frames=1 if stage == 1 else 12,  # F; 1 = image mode (stage 1); 12-frame clips: the paper (sec. 4.1)
      stride=1,
      resolution=512,  # frames are decoded (and rendered) at this size; latents are 1/8
      batch_size=32,  # global; each host loads batch_size / process_count
      flip=True,
      read_threads=4,
      workers=0,  # Grain worker processes per host
      # 261: pose, expression and gaze, the paper's motion [rho; beta; g] (and the release's MIA input); 257 drops
      # gaze (data with Deep3DFaceRecon's 257 columns only)
      coefficient_dim=261,
      # The release trains on blended rows: the source frame's identity, texture and lighting with the target
      # frame's expression, pose and gaze (train_video.py's coeffBlendSrcRef); the paper: the target's own rows.
      blend_source=False,
      face_model="",  # "": <path>/face_model.npz when present, else the synthetic model; or a BFM .mat / .npz
      render_shading="sh",
      # A latent cache at `path` (`mimajax cache-latents`): "auto" uses it when it is this run's (VAE, face model,
      # resolution, shading; flip off), "always" fails otherwise, "never" encodes in the step. Our choice.
      latents="auto",
    )
  )


def train_config(stage: int, variant: str = "paper") -> ml_collections.ConfigDict:
  """config.train: optimisation (AdamW, constant LR 1e-5 by default as in the paper)."""
  if stage == 1:
    trainable = STAGE1_TRAINABLE
  else:
    trainable = RELEASE_STAGE2_TRAINABLE if variant == "release" else STAGE2_TRAINABLE
  return ml_collections.ConfigDict(
    dict(
      learning_rate=1e-5,
      warmup_steps=0,
      weight_decay=1e-2,
      max_grad_norm=1.0,
      accumulation_steps=1,
      ema_decay=0.0,  # 0: no EMA copy
      trainable=trainable,
      memory_bank_size=4096,  # identity memory bank slots (paper variant); 0 disables the bank
      init_from="",  # stage 2: a stage-1 workdir (its latest checkpoint) or checkpoint step folder
    )
  )


def base_config(size: str, name: str, stage: int = 1, variant: str = "paper") -> ml_collections.ConfigDict:
  """The fields every experiment has, for model size `size`."""
  config = ml_collections.ConfigDict()
  config.name = name
  config.seed = 0
  config.stage = stage  # 1: images (U-Net, CLIP, MIA); 2: clips (motion modules, W_cond)
  config.total_steps = 100_000
  config.model = model_config(size)
  config.model.family = "mimaface"  # the model family (mimajax/families.py); recorded in the workdir
  config.model.mia = mia_config(size, variant)
  config.model.remat = "none"  # "none" | "full" | "dots" | "dots_no_batch": recompute U-Net layers in backward
  # MIMAFaceConfig's objective fields (mimajax/mimaface/model.py).
  config.model.objective = ml_collections.ConfigDict(
    dict(
      cfg_dropout=0.1,  # the paper (10% appearance-condition dropout) and the release
      cfg_dropout_scope="sample",  # "sample": each sample on its own (ours); "batch": the whole batch (the release)
      identity_loss_weight=0.1,  # lambda of L_id; the paper does not give it (our choice)
      identity_temperature=1.0,
      ica_sigma=0.1,
      ica_max_frames=ml_collections.config_dict.placeholder(int),  # None: F // 4 (paper eq. 3: k ~ U{0..F/4})
      ica_schedule="paper",  # "paper": k ~ U{0..F/4} per sample; "release": k = 0 half the steps, else U{1..4}
      clean_condition_prob=0.0,  # stage 1: how often the ICA channels carry the clean target (the release: 0.01)
      min_snr_gamma=ml_collections.config_dict.placeholder(float),  # None: plain MSE; the release uses 5.0
    )
  )
  config.model.clip_pretrained = ""  # local transformers CLIP vision folder (ViT-L/14)
  config.model.motion_pretrained = ""  # stage 2: diffusers MotionAdapter folder or AnimateDiff .ckpt/.safetensors
  config.data = data_config(stage)
  if variant == "release":
    config.data.coefficient_dim = 261  # the release's MIA reads the 4 gaze columns
  config.train = train_config(stage, variant)
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
  config.log = ml_collections.ConfigDict(dict(every_steps=50, progress_bar=True))
  config.sample = ml_collections.ConfigDict(
    # our sampler (the paper states none); configs/release.py sets the release's
    dict(
      every_steps=5000,
      count=2,
      num_inference_steps=25,
      guidance_scale=3.5,
      scheduler="ddim",
      timestep_spacing="leading",
    )  # fmt: skip
  )
  # Evaluation during training (mimajax.evaluation.during_training): every N steps (0: off), the first `pairs` pairs
  # of each protocol of `data` (default config.data.path), `frames` driving frames each, into TensorBoard.
  config.eval = ml_collections.ConfigDict(
    dict(every_steps=0, data="", pairs=2, frames=8, protocols="same_identity,cross_identity", seed=0, steps=0)
  )
  config.distributed = False  # True: jax.distributed.initialize() (multi-host GPU / TPU pods)
  config.noise_schedule = noise_schedule()
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: all remaining devices
  config.unet_axis_rules = UNET_AXIS_RULES
  config.vae_axis_rules = VAE_AXIS_RULES
  config.clip_axis_rules = CLIP_AXIS_RULES
  return config


def vae_stage_config(size: str) -> ml_collections.ConfigDict:
  """The VAE stage (mimajax/mimaface/vae_stage.py): the autoencoder stages 1 and 2 freeze, trained on single
  frames with LDM's objective; its fields are the MIMAFace config's, plus config.vae_stage (the loss)."""
  config = base_config(size, name=f"{size}_vae", stage="vae")
  config.data.update(num_frames=1)
  config.data.exclude_identities = ()  # held out: never loaded, so the PSNR of `vae_stage --eval` is on unseen faces
  config.train.update(trainable=(), learning_rate=1e-4, memory_bank_size=0)  # (): every VAE parameter trains
  config.sample.update(every_steps=500, count=4)  # every sample also exports the workdir's vae/
  config.vae_stage = ml_collections.ConfigDict(
    dict(
      mse_weight=0.0,  # + MSE beside L1 (PSNR-friendlier, blurrier)
      perceptual_weight=1.0,  # LPIPS, as LDM's autoencoders
      lpips_net="alex",
      kl_weight=1e-6,  # LDM's, on the KL sum against pixel-summed reconstruction terms
      sample_posterior=True,  # decode a posterior sample in training (the mean when False)
      disc_weight=0.0,  # patch-discriminator term; 0: no discriminator group at all
      disc_start=50_001,  # steps before the discriminator's losses count (LDM: 50001)
      disc_loss="hinge",  # "hinge" | "lsgan"
      disc_learning_rate=1e-4,
      disc_channels=64,
      disc_layers=3,
    )
  )
  return config


def sd15_training_config(stage: int, variant: str = "paper") -> ml_collections.ConfigDict:
  """Full-size training at 512 px: bf16 compute with fp32 master weights, cuDNN flash attention on GPUs
  (pass --config.model.attention_impl=xla on TPUs), rematerialised U-Net layers."""
  config = base_config("sd15", name=f"sd15_stage{stage}_{variant}", stage=stage, variant=variant)
  config.model.update(dtype="bfloat16", attention_impl="cudnn", remat="dots_no_batch")
  config.data.update(resolution=512, workers=8, read_threads=8)
  config.train.learning_rate = 1e-5
  return config
