"""An evaluation every `config.eval.every_steps` training steps, on a fixed small pair list, into TensorBoard.

The loop saves a checkpoint at each evaluation step and, on process 0, this module loads the family's animator from
it (`Family.load_animator`: exactly what `mimajax evaluate --checkpoint` would score) and scores the same pairs each
time: the first `config.eval.pairs` pairs of each protocol of `config.eval.data` (default: the training data; a
small held-out prepared folder is better: its index is read at the start), drawn with `config.eval.seed`. The
figures go to the run's metric writer as `eval/<protocol>/<metric>`. Every process evaluates (restoring a checkpoint
is a collective in Orbax; the scoring is the same on each), process 0 writes. The pairs and the face networks are
set up when training starts, so a missing weight file fails then; an evaluation that fails later is logged and
training goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mimajax.evaluation import command, protocols, scoring
from mimajax.evaluation.dataset import Dataset

log = logging.getLogger(__name__)


def check_config(config) -> None:
  """config.eval's fields (when evaluation is on): raises ValueError naming the field."""
  ev = config.get("eval")
  if ev is None or not ev.get("every_steps"):
    return
  if int(ev.every_steps) < 0 or int(ev.pairs) < 1 or int(ev.frames) < 1:
    raise ValueError(f"config.eval: every_steps ({ev.every_steps}) >= 0, pairs ({ev.pairs}) and frames "
                     f"({ev.frames}) >= 1 expected")  # fmt: skip
  unknown = set(_protocols(ev)) - set(protocols.PROTOCOLS)
  if unknown:
    raise ValueError(f"config.eval.protocols names {sorted(unknown)}; expected some of {protocols.PROTOCOLS}")
  data = ev.get("data") or config.data.get("path")
  if not data or not Path(data).exists():
    raise ValueError(
      f"config.eval.data={data!r} does not exist (a `mimajax prepare` folder; default: config.data.path)"
    )


def _protocols(ev) -> list[str]:
  return [p.strip() for p in str(ev.protocols).split(",") if p.strip()]


class TrainingEvaluator:
  def __init__(self, config):
    ev = config.eval
    self.options = {"steps": int(ev.get("steps") or 0) or None}
    self.dataset = Dataset(ev.get("data") or config.data.path)
    pairs = protocols.make_pairs(list(self.dataset.videos.values()), frames=int(ev.frames), seed=int(ev.seed),
                                 protocols=_protocols(ev))  # fmt: skip
    self.pairs = protocols.limit_pairs(pairs, int(ev.pairs))
    if not self.pairs:
      raise ValueError(f"config.eval: {self.dataset.path} gives no {ev.protocols} pairs (one identity, or videos "
                       "of fewer than 2 frames)")  # fmt: skip
    self.seed = int(ev.seed)
    face_model = self.dataset.face_model_path()
    nets = scoring.Networks.load(face_model=str(face_model) if face_model else None)
    first = self.pairs[0]
    resolution = int(self.dataset.read(first.source_video, first.source_frame, 1)[0].shape[1])
    self.scorer = scoring.Scorer(nets, resolution)

  def __call__(self, family, checkpoint: Path) -> dict[str, float]:
    """The model's figures, {"eval/<protocol>/<metric>": value}, for the checkpoint just saved."""
    try:
      animator = family.load_animator(Path(checkpoint), self.options)
      c = command.score_pairs(self.pairs, self.dataset, self.scorer, ["model"], animator=animator, seed=self.seed,
                              progress=False)  # fmt: skip
    except Exception as e:  # noqa: BLE001  (an evaluation is a report; it never stops the run it reports on)
      log.warning("evaluation of %s failed (%s: %s); training goes on", checkpoint, type(e).__name__, e)
      return {}
    figures = command.figures_of(c, ["model"])
    out = {}
    for protocol, systems in figures.items():
      for metric, (value, frames) in systems["model"].items():
        if value is not None and frames:
          out[f"eval/{protocol}/{metric}"] = float(value)
    return out
