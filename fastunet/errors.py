"""The exceptions and warnings fastunet raises for bad files and inputs.

Every error about a file's contents is a ``FastUNetError``; each type also derives from the
built-in type callers caught before it existed (``ValueError``), so ``except ValueError`` keeps
working. The message is one line that names the file, the problem and what to do, and is what
``fastunet predict`` prints for the same case.
"""

from __future__ import annotations

__all__ = ["FastUNetError", "CheckpointError", "ImageError", "LimitError", "NonFiniteInputWarning"]


class FastUNetError(Exception):
    """Base of the errors fastunet raises for a file or input it cannot use as it is."""


class CheckpointError(FastUNetError, ValueError):
    """A weights file or checkpoint directory that cannot be loaded as it is: unreadable,
    truncated or not a checkpoint, a malformed config, a newer format than this fastunet reads,
    weights that do not fit the architecture, or invalid values (non-finite tensors, a negative
    BatchNorm running variance, mixed floating-point dtypes), naming the file and the tensor."""


class ImageError(FastUNetError, ValueError):
    """An image file that cannot be read: not an image, truncated or corrupt, or a layout
    fastunet does not read (saying which)."""


class LimitError(FastUNetError, ValueError):
    """A size read from a file (image pixels, depth, width, decompressed bytes, config size) is
    over its limit. The message names the limit and how to raise it (``FASTUNET_LIMITS`` or
    ``fastunet.set_limits``; see ``fastunet.limits``)."""


class NonFiniteInputWarning(RuntimeWarning):
    """``predict``'s input holds NaN or Inf values: they spread through the convolutions to
    every output pixel they reach. Issued once per call, with the count."""
