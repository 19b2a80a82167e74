"""Exceptions shared by the checkpoint converters in :mod:`mimajax.convert`."""


class CheckpointKeyError(ValueError):
  """A checkpoint's keys or shapes do not match what the assumed model config expects.

  Raised instead of returning a partial state dict. Converters may attach the
  lists they found as attributes (``missing``, ``unexpected``, ``mismatched``).
  """


class CheckpointReadError(ValueError):
  """A checkpoint file or folder is missing, unreadable or not in the expected format."""


class CheckpointDamagedError(CheckpointReadError):
  """A saved checkpoint step cannot be read back as it was written: an unreadable or truncated array file, or
  arrays that differ from the checksums recorded when it was saved. Readers fall back to an older intact step."""
