"""Frechet Inception Distance from feature sets: the statistics and the distance as pytorch-fid computes them.

FID estimates the distance between two Gaussians fitted to Inception pool features. With few samples the
estimate is biased upwards (the covariance of N < 2048 samples is rank-deficient, and the bias shrinks only
like 1/N), so values from different frame counts are not comparable: every reported FID must carry the number
of frames of each set (`mimajax evaluate` records it next to the value).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of [N, D] features in float64; the covariance is unbiased (N - 1), as np.cov(rowvar=False)."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {x.shape}")
  if x.shape[0] < 2:
    raise ValueError(f"FID needs at least 2 samples per set for a covariance, got {x.shape[0]}")
  return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), step for step as pytorch-fid's calculate_frechet_distance.

  When sqrtm of the product is not finite (a singular product), eps * I is added to both covariances and the
  root retaken. A small imaginary part from round-off is dropped; one above 1e-3 on the diagonal raises
  ValueError (the covariances are not what a feature set gives).
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors differ in length: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape:
    raise ValueError(f"covariances differ in shape: {sigma1.shape} vs {sigma2.shape}")
  diff = mu1 - mu2
  # `linalg.sqrtm` is looked up at call time (tests replace it to reach the eps branch). Without `disp` it
  # returns the same root as pytorch-fid's `disp=False` call, which newer SciPy deprecates.
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"FID: the covariance product is singular; adding {eps} to the diagonal of both", stacklevel=2)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: sqrt of the covariance product has an imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(features_a, features_b, eps: float = 1e-6) -> float:
  """FID between two [N, D] feature sets (N may differ; report both counts with the value)."""
  mu_a, sigma_a = feature_statistics(features_a)
  mu_b, sigma_b = feature_statistics(features_b)
  return frechet_distance(mu_a, sigma_a, mu_b, sigma_b, eps=eps)
