"""One error hierarchy for actcache.

``UserError`` subclasses are mistakes a user can fix (bad input, bad config, a refused
job): the CLI prints their message as one line and exits 2. Anything else is a fault of
the system: exit 1, traceback to a log file. Each subclass also inherits the builtin a
Python caller would expect, so ``except KeyError`` keeps working.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class ActcacheError(Exception):
    """Base of every error actcache raises on purpose."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says what was committed and how to finish.

    A ``KeyboardInterrupt`` only, not an ``ActcacheError``: those are exceptions, and
    an ``except Exception`` anywhere between the run and the CLI would swallow a Ctrl-C.
    """


class UserError(ActcacheError):
    """A mistake in what the user gave: the message names the culprit and the fix."""


class ConfigError(UserError, ValueError):
    """An invalid job, probe or query configuration."""


class InputDataError(UserError, ValueError):
    """The inputs file is missing, malformed, or lacks a needed column or value."""


class InputFileNotFoundError(InputDataError, FileNotFoundError):
    """The inputs file does not exist."""


class MediaFileError(InputDataError):
    """An image or audio file cannot be read or decoded when a worker reaches it."""


class ModelLoadError(UserError, OSError):
    """The model or its tokenizer/processor cannot be loaded from the given path or id."""


class SelfCheckError(UserError, ValueError):
    """The model gives different values in a padded batch than alone, and no fix helped."""


class LayerNotFoundError(UserError, KeyError):
    """A requested layer is outside the model, or not in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PoolingNotFoundError(UserError, KeyError):
    """A requested pooling is not in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IdNotFoundError(UserError, KeyError):
    """An id is not in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ColumnNotFoundError(UserError, KeyError):
    """A metadata column is not in the store or the inputs."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StoreMismatchError(UserError, ValueError):
    """An existing store was written by a job that differs in a field that shapes it."""


class StoreNotFoundError(UserError, FileNotFoundError):
    """No actcache store at the given URL."""


class StoreIncompleteError(UserError, ValueError):
    """The store has units that are not complete, and the operation needs all of them."""


class StorageAccessError(UserError, OSError):
    """The object store refuses for good: no such bucket, access denied."""


class StorageFullError(UserError, OSError):
    """The store's filesystem or bucket has no space left: committed units stay readable."""


class StoreCorruptError(UserError, OSError):
    """A stored chunk fails its checksum: the message names the units to repair."""


class OverflowStorageError(UserError, OverflowError):
    """A value does not fit the storage dtype (float16 beyond ±65504)."""


class LeaseHeldError(UserError, RuntimeError):
    """Another live run holds the store's write lease."""


class LeaseLostError(UserError, RuntimeError):
    """Another run took this run's write lease (its heartbeat went stale): it stopped."""


class ProbeDataError(UserError, ValueError):
    """Labels or splits cannot train a probe (one class, constant, empty split...)."""


class JobSubmissionError(UserError, RuntimeError):
    """The Ray Jobs API refused a job or the job failed."""


class ShapeMismatchError(UserError, ValueError):
    """A vector given to a query (direction, query point) does not fit the store's width."""


class ModelTooLargeError(UserError, ValueError):
    """The model's weights do not fit the GPUs an actor reserves (and offload was not asked)."""


def rename_fields(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with each backticked config field in ``flags`` written as its flag."""
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(0)), message)


@contextmanager
def flag_names(flags: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a ``UserError`` naming the command-line flag where it named a config field.

    Errors say "`pooling`" for the field of a job or probe config; a user who typed
    options should read "--pooling". Only the given fields are renamed.
    """
    try:
        yield
    except UserError as e:
        renamed = rename_fields(str(e), flags)
        if renamed == str(e):
            raise
        raise type(e)(renamed).with_traceback(e.__traceback__) from None
