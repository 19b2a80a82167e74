"""MMFA's training objective (eq. 14) as the two losses of the shared loop: the generator group's and the
discriminator group's, from the same step key and the same starting parameters (face-vid2vid's alternation).

Generator (eq. 14, weights in config.loss with their sources in configs/mmfa.py):
  L = L_P (eq. 6, multi-scale perceptual) + L_G (LSGAN) + L_FM (feature matching) + L_E (eq. 15, equivariance)
      + L_K (keypoint prior) + L_D (deformation prior) + L_S (eq. 7) + L_C (eq. 8) + L_L (eq. 9, when weighted)
Discriminator: LSGAN on the real driver against the generated frame (stop-gradient), at every configured scale.

Frozen networks the losses read (the perceptual VGG, the landmark network) travel in the prepared batch under
`train_step.SHARED_KEY`, whole in every accumulation micro-batch; R of eq. 5 is computed in `prepare` from the
stored pose (or the frozen Hopenet).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mimajax import families, train_step
from mimajax.face3d import coefficients as coefficient_layout
from mimajax.mmfa import keypoints, losses, perceptual
from mimajax.mmfa.model import MMFA, build_discriminator, images
from mimajax.mmfa.transforms import RandomTransform

log = logging.getLogger("mimajax.train")
GENERATOR, DISCRIMINATOR = "generator", "discriminator"
GAN_MODES = ("lsgan",)  # the paper's least squares (face-vid2vid's config defaults to hinge; not offered)
SHARED = train_step.SHARED_KEY


@dataclasses.dataclass
class Parts:
  generator: MMFA
  discriminator: nnx.Module
  generator_loss: Callable
  discriminator_loss: Callable
  prepare: Callable
  frozen: dict
  init_params: Callable | None


def optimizer(config, learning_rate: float) -> families.OptimizerConfig:
  t = config.train
  return families.OptimizerConfig(learning_rate=learning_rate, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
                                  b1=t.b1, b2=t.b2, max_grad_norm=t.max_grad_norm or None)  # fmt: skip


def pyramid(image: jax.Array, scales) -> dict[str, jax.Array]:
  """face-vid2vid's ImagePyramide keys ("prediction_1", "prediction_0.5", ...) at the discriminator's scales."""
  out = {}
  for s in scales:
    n, h, w, c = image.shape
    size = (n, max(1, round(h * s)), max(1, round(w * s)), c)
    out[f"prediction_{s}"] = image if s == 1 else jax.image.resize(image, size, "linear", antialias=True)
  return out


def rotations(rows: jax.Array) -> jax.Array:
  a, b = coefficient_layout.COEFFICIENT_SLICES["angle"]
  return keypoints.rotation_from_deep3d(rows[..., a:b].astype(jnp.float32))


def build(config) -> Parts:
  rngs = nnx.Rngs(config.seed)
  generator = MMFA(config.model, rngs=rngs)
  discriminator = build_discriminator(config.model, rngs=rngs)
  w = config.loss
  scales = tuple(float(s) if float(s) != 1 else 1 for s in config.model.discriminator.scales)
  vgg = perceptual.load_perceptual_network(w.perceptual_network, w.perceptual_weights or None)
  log.info("perceptual loss: %s (VGG-Face term: %s)", w.perceptual_network,
           "on" if w.vgg_face else "off: no VGG-Face weights offline (the paper's top-scale term)")  # fmt: skip
  landmark_net = None
  if w.landmark:
    from mimajax.faces.facemesh_net import FaceMeshNet

    landmark_net = FaceMeshNet.from_package()
  frozen = {"vgg": vgg} if landmark_net is None else {"vgg": vgg, "landmarks": landmark_net}
  rotation_mode = config.model.rotation
  hopenet = None
  if rotation_mode == "hopenet":
    from mimajax.mmfa import hopenet as hopenet_module

    hopenet = hopenet_module.load_hopenet(config.model.hopenet_weights)
    frozen["hopenet"] = nnx.state(hopenet)
  hopenet_graphdef = nnx.graphdef(hopenet) if hopenet is not None else None

  def prepare(frozen, batch):
    source, driver = images(batch["source_frame"]), images(batch["frames"])
    if rotation_mode == "hopenet":
      net = nnx.merge(hopenet_graphdef, frozen["hopenet"])
      r_source, r_driver = net.rotation(source), net.rotation(driver)
    else:
      r_source, r_driver = rotations(batch["source_motion"]), rotations(batch["motion"])
    shared = {k: frozen[k] for k in ("vgg", "landmarks") if k in frozen}
    return {"source": source, "driver": driver, "source_rotation": r_source, "driver_rotation": r_driver,
            SHARED: shared}  # fmt: skip

  transform = dict(w.transform)

  def generator_loss(modules, batch, rng, extra):
    del extra
    g, d = modules[GENERATOR], modules[DISCRIMINATOR]
    source, driver = batch["source"], batch["driver"]
    k_eq, k_aug = jax.random.split(jax.random.fold_in(rng, 1))
    n = driver.shape[0]
    warp = RandomTransform.sample(k_eq, n, **transform) if w.equivariance else None
    # eq. 7's augmentation: a rotated, scaled, shifted copy of the driver has the driver's expression
    aug = RandomTransform.similarity(k_aug, n) if w.expression_representation else None
    out = g(source, driver, batch["source_rotation"], batch["driver_rotation"],
            transformed=None if warp is None else warp.transform_frame(driver),
            augmented=None if aug is None else aug.transform_frame(driver))  # fmt: skip
    features = lambda x: perceptual.vgg_features(batch[SHARED]["vgg"], x, w.perceptual_network)
    terms = {}
    terms["perceptual"] = losses.multiscale_perceptual_loss(
      features, out["predictions"], driver, scales=tuple(w.perceptual_scales), layer_weights=tuple(w.perceptual)
    )
    if w.generator_gan:
      fake = d(pyramid(out["prediction"], scales))
      real = d(pyramid(driver, scales))
      terms["gan"] = w.generator_gan * losses.lsgan_generator_loss(fake)
      if any(w.feature_matching):
        terms["feature_matching"] = losses.feature_matching_loss(real, fake, layer_weights=tuple(w.feature_matching))
    if w.equivariance:  # eq. 15; the transformed face is "another identity" (appendix A.2): its own x_c
      terms["equivariance"] = w.equivariance * losses.equivariance_loss(out["kp_driving"], out["kp_transformed"], warp)
    if w.keypoint_prior:
      terms["keypoint_prior"] = w.keypoint_prior * losses.keypoint_prior_loss(out["kp_driving"])
    if w.deformation_prior:
      terms["deformation_prior"] = w.deformation_prior * losses.deformation_prior_loss(out["driver_motion"].delta)
    if w.expression_representation:
      terms["expression_representation"] = w.expression_representation * losses.expression_representation_loss(
        out["f_exp_driver"], out["f_exp_augmented"]
      )
    if w.identity_consistency:  # eq. 8: the driver's canonical keypoints are the source's (same identity)
      terms["identity_consistency"] = w.identity_consistency * losses.identity_latent_consistency_loss(
        out["canonical"], out["driver_canonical"]
      )
    if w.landmark:
      net = batch[SHARED]["landmarks"]
      terms["landmark"] = w.landmark * losses.landmark_loss(
        net.landmarks_2d(out["prediction"]), jax.lax.stop_gradient(net.landmarks_2d(driver))
      )
    total = sum(terms.values())
    aux = dict(terms)
    aux["l1"] = jnp.mean(jnp.abs(out["prediction"] - driver))
    aux["scale_mean"] = jnp.mean(out["driver_motion"].scale)
    aux["deformation_norm"] = jnp.mean(jnp.abs(out["driver_motion"].delta))
    return total, aux

  def discriminator_loss(modules, batch, rng, extra):
    del rng, extra
    g, d = modules[GENERATOR], modules[DISCRIMINATOR]
    driver = batch["driver"]
    out = g(batch["source"], driver, batch["source_rotation"], batch["driver_rotation"])
    fake = d(pyramid(jax.lax.stop_gradient(out["prediction"]), scales))
    real = d(pyramid(driver, scales))
    loss = w.discriminator_gan * losses.lsgan_discriminator_loss(real, fake)
    return loss, {"real_score": jnp.mean(real[f"prediction_map_{scales[0]}"]),
                  "fake_score": jnp.mean(fake[f"prediction_map_{scales[0]}"])}  # fmt: skip

  init_params = None
  if config.model.init_from_face_vid2vid:
    path = config.model.init_from_face_vid2vid

    def init_params(params: dict[str, Any]) -> dict[str, Any]:
      from mimajax.mmfa import face_vid2vid_format

      g = nnx.merge(nnx.graphdef(generator), params[GENERATOR], nnx.state(generator, nnx.Not(nnx.Param)))
      dsc = nnx.merge(nnx.graphdef(discriminator), params[DISCRIMINATOR],
                      nnx.state(discriminator, nnx.Not(nnx.Param)))  # fmt: skip
      report = face_vid2vid_format.init_from_face_vid2vid(path, {GENERATOR: g, DISCRIMINATOR: dsc})
      log.info("face-vid2vid checkpoint %s: %s", path, report)
      return {GENERATOR: nnx.state(g, nnx.Param), DISCRIMINATOR: nnx.state(dsc, nnx.Param)}

  return Parts(generator, discriminator, generator_loss, discriminator_loss, prepare, frozen, init_params)
