"""What a caching run keeps off the terminal, and what Ctrl-C may not cut short.

The terminal shows the progress bar and the summary line. Ray's own messages (its
token-authentication warning, "Started a local Ray instance", shutdown notes) go to a
log file per run instead, ``cache-{run_id}.log`` in the log folder; the actors' output
stays in Ray's session logs, whose folder that file names.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def run_log(run_id: str) -> Path:
    from actcache.logdir import log_dir

    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"cache-{run_id}.log"


@contextmanager
def ray_output_to(path: Path) -> Iterator[None]:
    """Send the ``ray`` logger's records to ``path`` instead of the terminal."""
    import ray  # noqa: F401 - importing ray installs the handlers replaced here

    logger = logging.getLogger("ray")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = logger.handlers[:]
    logger.handlers = [handler]
    try:
        yield
    finally:
        logger.handlers = saved
        handler.close()


def note(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text.rstrip() + "\n")


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C while the block runs (recording a run, stopping Ray), then deliver it.

    A second Ctrl-C during Ray's shutdown once left its processes orphaned; here it waits
    until what was started has stopped.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *args: pending.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt
