"""How every `mimajax` command reports an error: one or two lines on stderr, an exit code, a traceback on request.

  prog: error: <what was wrong and what was expected>
    <the rest of a longer message, on one line>

Exit codes: 2 for bad input (a missing or malformed file, a bad option or config: `BAD_INPUT_TYPES`), 1 for a check
or a run that failed (a parity above tolerance, a non-finite loss, a full disk, anything unexpected). The traceback
is printed too (before the message) with `mimajax --debug VERB ...` or the environment variable MIMAJAX_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Iterator

BAD_INPUT, FAILED = 2, 1
BAD_INPUT_TYPES = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                   PermissionError)  # fmt: skip
MAX_DETAIL = 300  # characters of a long message's second line
DEBUG_HINT = "rerun with --debug (mimajax --debug VERB ...) or MIMAJAX_DEBUG=1 for the traceback"

_debug = False


def debug() -> bool:
  """Whether tracebacks are wanted: `mimajax --debug` or MIMAJAX_DEBUG set to anything but "", "0", "false", "no"."""
  return _debug or os.environ.get("MIMAJAX_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def debugging(on: bool = True) -> Iterator[None]:
  """Tracebacks on for the block (what `mimajax --debug` sets)."""
  global _debug
  saved, _debug = _debug, _debug or on
  try:
    yield
  finally:
    _debug = saved


def exit_code(e: BaseException) -> int:
  return BAD_INPUT if isinstance(e, BAD_INPUT_TYPES) else FAILED


def describe(e: BaseException) -> str:
  """The exception's message (one or two lines); unexpected kinds are named ("KeyError: 'x'")."""
  text = str(e).strip()
  if isinstance(e, KeyError) and len(e.args) == 1:
    text = repr(e.args[0])
  if not text or not isinstance(e, (*BAD_INPUT_TYPES, OSError)):
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if len(lines) <= 1:
    return lines[0] if lines else type(e).__name__
  rest = " ".join(lines[1:])
  if len(rest) > MAX_DETAIL:
    rest = rest[:MAX_DETAIL].rstrip() + " ... (the whole message: --debug)"
  return f"{lines[0]}\n  {rest}"


def report(prog: str, e: BaseException, *, code: int | None = None, context: str = "") -> int:
  """Prints `prog: error: [context: ]message` on stderr (the traceback first when `debug()`); returns the exit code
  (`code`, else 2 for bad input and 1 for anything else)."""
  if debug():
    traceback.print_exception(e, file=sys.stderr)
  code = exit_code(e) if code is None else code
  text = describe(e)
  if context:
    text = f"{context}: {text}"
  if code == FAILED and not isinstance(e, (*BAD_INPUT_TYPES, OSError, FloatingPointError)) and not debug():
    text += f" ({DEBUG_HINT})"  # unexpected: most likely a bug, whose traceback is wanted
  print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
  return code


def fail(prog: str, message: str, code: int = BAD_INPUT) -> int:
  """Prints `prog: error: message` on stderr; returns `code` (for errors that are no exception)."""
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  return code
