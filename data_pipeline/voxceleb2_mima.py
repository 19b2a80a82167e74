"""TFDS builder `voxceleb2_mima`: a manually downloaded VoxCeleb2 (+ 3DMM coefficients) as array_record.

A thin wrapper over prepare.py: the same discovery (clip_files.py), coefficient checks, cropping and segmentation, so
one example is one `records.Record` (a segment of up to frames_per_record frames of one clip), stored with
`records.to_tfds_example` and read back with `records.from_tfds_example` (all the Grain loader needs: reading a
source does not import this builder or the preparation job).

Manual download folder (`manual_dir`): either `dev/` and/or `test/` (VoxCeleb2's archives unpacked;
an inner `mp4/` is looked through) giving the train and test splits, or the layout
`<speaker>/<video>/<clip>.mp4` directly, giving train only. Coefficients (`<clip>.npy` or Deep3DFaceRecon
`<clip>.mat`) sit beside each clip or under `manual_dir/coefficients/` with the same relative path.

  import tensorflow_datasets as tfds
  from data_pipeline import voxceleb2_mima  # registers the builder
  source = voxceleb2_mima.data_source(data_dir, split="train", manual_dir=folder)
  loader.make_iterator(source, loader.LoaderConfig(...))  # the Grain loader takes it like shards
  records.from_tfds_example(source[0])  # one example as a records.Record

Clips that cannot be used are skipped with a logged reason (as in `mimajax prepare`).

At scale the builder runs on Apache Beam (`data_source(..., beam_options=["--runner=DataflowRunner", ...])`, or
the builder kwarg `beam=True` with TFDS's `DownloadConfig(beam_options=...)`): `_generate_examples` is then the
PTransform Create(clips) -> Reshuffle -> FlatMap(the same per-clip function), and TFDS's Beam writer shards the
examples; the examples are the same as without Beam (a test checks this on the DirectRunner).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import clip_files, prepare, records

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Voxceleb2MimaConfig(tfds.core.BuilderConfig):
  resolution: int = 512
  frames_per_record: int = 64
  min_frames: int = 13  # a 12-frame clip and a source frame outside it
  crop: str = "center"
  quality: int = 90

  def prepare_options(self) -> prepare.PrepareOptions:
    return prepare.PrepareOptions(resolution=self.resolution, frames_per_record=self.frames_per_record,
                                  min_frames=self.min_frames, crop=self.crop, quality=self.quality)  # fmt: skip


class Voxceleb2Mima(tfds.core.GeneratorBasedBuilder):
  """VoxCeleb2 clips with per-frame 3DMM coefficients, in segments of consecutive frames."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Segments of up to frames_per_record frames: JPEG frames, coefficients, speaker."}
  BUILDER_CONFIGS = [
    Voxceleb2MimaConfig(name="512", description="512 px frames (MIMAFace's training resolution)"),
    Voxceleb2MimaConfig(name="256", description="256 px frames", resolution=256),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put VoxCeleb2's clips in manual_dir as dev/mp4/<speaker>/<video>/<clip>.mp4 (and test/...), or
  directly as <speaker>/<video>/<clip>.mp4, with <clip>.npy or Deep3DFaceRecon <clip>.mat coefficients
  (one row per frame, 257 or 261 columns) beside each clip or under manual_dir/coefficients/.
  """

  def __init__(self, *, file_format=None, beam: bool = False, **kwargs):
    self._beam = beam  # before super(): TFDS may inspect the generator while initialising
    super().__init__(file_format=file_format or "array_record", **kwargs)  # random access for Grain

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "video_id": tfds.features.Text(),
          "speaker": tfds.features.Text(),
          "identity": tfds.features.Scalar(np.int64, doc="index of speaker in metadata['identities']"),
          "frame_indices": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "coefficients": tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding="bytes"),
          # Encoded JPEG bytes, not tfds Image: its NumPy reader would decode all frames of a record
          # (SkipDecoding has no NumPy path), and the loader decodes only the F + 1 frames it samples.
          "frames": tfds.features.Sequence(
            tfds.features.Tensor(shape=(), dtype=np.object_), doc=f"{r}x{r} RGB frames, JPEG bytes"
          ),
        }
      ),
      metadata=tfds.core.MetadataDict(),
      homepage="https://www.robots.ox.ac.uk/~vgg/data/voxceleb/vox2.html",
    )

  def _split_generators(self, dl_manager):
    root = Path(dl_manager.manual_dir)
    splits = {name: root / folder for name, folder in (("train", "dev"), ("test", "test")) if (root / folder).is_dir()}
    splits = {k: (v / "mp4" if (v / "mp4").is_dir() else v) for k, v in splits.items()} or {"train": root}
    coeff_root = root / "coefficients"
    entries = {}
    for name, folder in splits.items():
      coeffs = coeff_root / folder.relative_to(root) if coeff_root.is_dir() else None
      entries[name] = clip_files.discover_videos(folder, coeffs)
    identities = sorted({e.speaker for es in entries.values() for e in es})
    self.info.metadata["identities"] = identities
    vocab = {s: i for i, s in enumerate(identities)}
    return {name: self._generate_examples(es, vocab) for name, es in entries.items()}

  def _generate_examples(self, entries, vocab):
    options = self.builder_config.prepare_options()
    if self._beam:
      import apache_beam as beam

      return (
        beam.Create(list(entries), reshuffle=False)
        | beam.Reshuffle()  # spread the clips over the workers (Create alone would fuse them into one bundle)
        | beam.FlatMap(clip_examples, vocab=vocab, options=options)
      )
    return (example for entry in entries for example in clip_examples(entry, vocab, options))


def clip_examples(entry: clip_files.VideoEntry, vocab: dict[str, int], options: prepare.PrepareOptions):
  """One clip's (key, example) pairs, one per record; none (with the reason logged) for a clip that is skipped."""
  try:
    recs = prepare.process_video(entry, vocab[entry.speaker], options)
  except prepare.SkipVideo as e:
    log.warning("skipped %s: %s", entry.video_id, e)
    return []
  return [(f"{rec.video_id}:{int(rec.frame_indices[0])}", records.to_tfds_example(rec)) for rec in recs]


def data_source(data_dir: str | os.PathLike, *, split: str = "train", config: str = "512",
                manual_dir: str | os.PathLike | None = None, beam_options: list[str] | None = None):  # fmt: skip
  """tfds.data_source for this builder (preparing it from manual_dir if needed).

  beam_options: prepare it with Apache Beam, with these pipeline options (["--runner=DirectRunner"], or Dataflow's,
  Flink's or Spark's; docs/scale_plan.md); None prepares it in this process."""
  kwargs, builder_kwargs = {}, {"file_format": "array_record"}
  if manual_dir is not None:
    config_kwargs = dict(manual_dir=str(manual_dir))
    if beam_options is not None:
      from apache_beam.options.pipeline_options import PipelineOptions

      config_kwargs["beam_options"] = PipelineOptions(list(beam_options))
      builder_kwargs["beam"] = True
    kwargs["download_and_prepare_kwargs"] = {"download_config": tfds.download.DownloadConfig(**config_kwargs)}
  return tfds.data_source(
    f"voxceleb2_mima/{config}",
    split=split,
    data_dir=str(data_dir),
    builder_kwargs=builder_kwargs,
    **kwargs,
  )
