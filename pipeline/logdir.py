"""Where actcache writes its log files: one home for the CLI, the driver and the scheduler.

Kept apart from the CLI module so that the driver and the scheduler need not import the
command line (and its command registrations) to find a folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def log_dir() -> Path:
    """``ACTCACHE_LOG_DIR``, else ``~/.cache/actcache/logs``."""
    base = os.environ.get("ACTCACHE_LOG_DIR") or Path.home() / ".cache" / "actcache" / "logs"
    return Path(base)
