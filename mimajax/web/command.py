"""`mimajax serve --checkpoint CKPT [--port 7860]`: the web page for a trained model of any family.

The family comes from the checkpoint (as for `animate`); its `load_served` loads the model once, before the port
opens, so a bad checkpoint fails here with a message and a running server never loads again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mimajax import cli_errors, families, serving
from mimajax.errors import CheckpointReadError

PROG = "mimajax serve"
log = logging.getLogger("mimajax.serve")


def add_arguments(p) -> None:
  p.add_argument("--checkpoint", required=True, help="a training workdir, checkpoint step, export or release folder")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--max-frames", type=int, default=serving.DEFAULT_MAX_FRAMES, help="frames a request may ask for")
  p.add_argument("--queue-size", type=int, default=16, help="requests that may wait for the device")
  p.add_argument("--temp-dir", default=None, help="where requests' files live while they run (default: the system's)")
  p.add_argument("--vae", default=None, metavar="DIR", help="MIMAFace release folders: a diffusers VAE folder")
  p.add_argument("--face-model", default=None, metavar="PATH", help="MIMAFace release folders: BFM_model_front.mat")
  p.add_argument("--expression-vae", default=None, metavar="WORKDIR",
                 help="MMFA: an expression VAE stage, for expression interpolation")  # fmt: skip
  p.add_argument("--no-ema", action="store_true", help="the raw weights rather than the EMA copy")


def load(args) -> serving.ServedModel:
  """The checkpoint's family's served model (ValueError / CheckpointReadError naming what is wrong)."""
  if not Path(args.checkpoint).exists():
    raise ValueError(f"--checkpoint {args.checkpoint} does not exist")
  name = families.family_of_checkpoint(args.checkpoint)
  family = families.get(name)
  if family.load_served is None:
    raise ValueError(f"the {name!r} model family has no web page (its Family sets no load_served)")
  options = {"vae": args.vae, "face_model": args.face_model, "expression_vae": args.expression_vae,
             "no_ema": args.no_ema}  # fmt: skip
  return family.load_served(Path(args.checkpoint), options)


def run(args) -> int:
  """Serves until interrupted; 2 with a message for a bad checkpoint or option (nothing is served)."""
  if args.max_frames < 1:
    return cli_errors.fail(PROG, f"--max-frames must be >= 1; got {args.max_frames}")
  if not 0 < args.port < 65536:
    return cli_errors.fail(PROG, f"--port must be in 1..65535; got {args.port}")
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry: the machines may have no network
  try:
    import gradio  # noqa: F401
  except ImportError as e:
    return cli_errors.fail(PROG, f"the web page needs gradio ({e}): pip install 'mimajax[serve]'")
  from mimajax.web import app

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  try:
    model = load(args)
  except (ValueError, OSError, CheckpointReadError) as e:
    return cli_errors.report(PROG, e, code=cli_errors.BAD_INPUT)
  log.info("serving %s (%s) on http://%s:%d", model.name, model.family, args.host, args.port)
  page = app.build(model, max_frames=args.max_frames, temp_root=args.temp_dir)
  app.launch(page, host=args.host, port=args.port, queue_size=args.queue_size, temp_root=args.temp_dir)
  return 0
