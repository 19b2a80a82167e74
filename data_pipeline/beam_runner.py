"""`mimajax prepare --runner direct|dataflow|flink|spark`: the shards written by an Apache Beam pipeline.

The unit of work is the shard, as with `--runner local`: `prepare.write_shard` (the same per-video function,
`prepare.process_video`) turns one `ShardTask` (a few dozen video paths and the options, a few KiB) into one
ArrayRecord file and its stats `.json`. The pipeline is

  Create(shard tasks) -> Reshuffle -> Map(write_shard)

Reshuffle breaks the fusion of Create with the work, so a runner spreads the shards over its workers instead of
running them all in the bundle that created them. The frames never pass through the pipeline: each worker decodes
its videos and writes its shard where the output lives, so nothing of the ~10 TiB of VoxCeleb2 records is
shuffled. The driver then builds `manifest.json` from the stats files, exactly as the local runner does; the same
tasks give the same bytes, whichever runner wrote them (a test checks this for DirectRunner).

Retries and speculative attempts: a runner may run a bundle again after a worker failed, or twice at once. Each
attempt writes under its own temporary name and renames it into place when complete (an atomic replace on one
filesystem); every attempt writes the same bytes, so the shard is whole and appears once, whoever finishes last.
A shard already complete when the pipeline is built is not a task at all, so a re-run resumes.

Input and output must be a filesystem path that every worker sees at the same place (NFS, Filestore, Lustre, a
Cloud Storage FUSE mount): the shard writer (ArrayRecord) and the video decoder (OpenCV) open local paths. A URL
(gs://, s3://, hdfs://) is refused with that explanation rather than failing on a worker.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Sequence

log = logging.getLogger(__name__)

RUNNERS = ("local", "direct", "dataflow", "flink", "spark")
BEAM_RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_runner(runner: str, beam_args: Sequence[str], paths: Sequence[str]) -> None:
  """ValueError naming what is wrong with a runner, its options or a path it cannot use."""
  if runner not in RUNNERS:
    raise ValueError(f"runner={runner!r}; expected one of {', '.join(RUNNERS)}")
  if runner == "local" and beam_args:
    raise ValueError(f"Beam pipeline options {list(beam_args)} were given with --runner local; they apply only to "
                     f"--runner {', '.join(BEAM_RUNNERS)}")  # fmt: skip
  for a in beam_args:
    if not a.startswith("--"):
      raise ValueError(f"Beam pipeline option {a!r}; expected the form --name=value (after `--` on the command line)")
    if a.split("=", 1)[0] == "--runner":
      raise ValueError(f"{a!r} among the Beam options; choose the runner with mimajax's own --runner {RUNNERS}")
  for p in paths:
    if p is not None and _URL.match(str(p)):
      raise ValueError(
        f"{p}: a URL; every Beam worker must see --input, --coefficients and --output as a filesystem path at the "
        "same place (NFS, Filestore, Lustre, a Cloud Storage FUSE mount), since videos are decoded and shards "
        "written with local file IO"
      )


def pipeline_options(runner: str, beam_args: Sequence[str], workers: int):
  """Beam PipelineOptions for the runner; `--workers N` becomes DirectRunner's worker processes unless the Beam
  options set them."""
  from apache_beam.options.pipeline_options import PipelineOptions

  args = [f"--runner={BEAM_RUNNERS[runner]}", *beam_args]
  names = {a.split("=", 1)[0] for a in beam_args}
  if runner == "direct" and workers > 1 and "--direct_num_workers" not in names:
    args += [f"--direct_num_workers={workers}"]
    if "--direct_running_mode" not in names:
      args += ["--direct_running_mode=multi_processing"]  # processes: decoding and JPEG coding hold the GIL
  return PipelineOptions(args)


def _counted(work: Callable):
  """work(task) -> {counter: increment} on a worker, the counters as Beam metrics ("mimajax" namespace) that a
  runner's monitoring shows (videos processed, skips per reason, records written)."""

  def run(task):
    from apache_beam.metrics import Metrics

    for name, n in (work(task) or {}).items():
      Metrics.counter("mimajax", name).inc(n)
    return None

  return run


def run_shards(tasks: Sequence, work: Callable, runner: str, beam_args: Sequence[str] = (), workers: int = 1,
               name: str = "prepare") -> None:  # fmt: skip
  """Run work(task) (a picklable callable that writes one shard and returns its counters) on every task with a
  Beam pipeline on `runner`; returns when the pipeline has finished (a failed pipeline raises, and the shards it
  completed stay, so a re-run resumes). `work` is passed in, so this module imports no job; one that needs a
  heavy resource (the latent cache's VAE) builds it on its first call on each worker and keeps it."""
  if not tasks:
    return
  import apache_beam as beam

  log.info("%s: %d shards on Beam's %s", name, len(tasks), BEAM_RUNNERS[runner])
  with beam.Pipeline(options=pipeline_options(runner, beam_args, workers)) as p:
    _ = (
      p
      | "ShardTasks" >> beam.Create(list(tasks), reshuffle=False)
      | "SpreadOverWorkers" >> beam.Reshuffle()
      | "WriteShard" >> beam.Map(_counted(work))
    )
