"""MMFA's training data: pairs of frames of one video from the prepared shards (the shared Grain loader's image
mode: a driver frame, a source frame outside it, and both frames' coefficient rows, which carry the stored pose)."""

from __future__ import annotations

import jax
import ml_collections

from data_pipeline import loader


def data_iterator(config: ml_collections.ConfigDict):
  """This host's Grain iterator: per sample a driver frame and a source frame of the same video (image mode)."""
  d = config.data
  cfg = loader.LoaderConfig(
    num_frames=1,
    batch_size=d.batch_size // jax.process_count(),
    resolution=d.resolution,
    source_resolution=d.resolution,
    flip=d.flip,
    seed=config.seed,
    coefficient_dim=d.coefficient_dim,
    exclude_identities=tuple(d.exclude_identities),
  )
  return loader.make_iterator(d.path, cfg, workers=d.workers, read_threads=d.read_threads)
