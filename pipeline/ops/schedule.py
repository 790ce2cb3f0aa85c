"""Nightly runs with cron: a crontab line that submits the job and waits for it.

The line runs ``python -m actcache.cli submit <job> --address URL --wait`` (without a Ray
address: ``python -m actcache.cli cache <job>`` on this machine) with the
interpreter that rendered it (cron's PATH is minimal, so nothing is looked up), appends
its output to a log file, and ends with a comment tag naming the job file. ``--install``
puts it into the user's crontab through the ``crontab`` binary, replacing any earlier
line with the same tag, so scheduling a job twice leaves one line.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from actcache.schemas.errors import ConfigError

TAG = "# actcache-schedule:"
_CRON_FIELDS = 5
_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def check_cron(expr: str) -> str:
    """The cron expression, stripped; an error unless it has five fields or is a macro."""
    text = " ".join(expr.split())
    if text in _MACROS:
        return text
    parts = text.split(" ")
    allowed = set("0123456789*/,-abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    if len(parts) != _CRON_FIELDS or any(not p or set(p) - allowed for p in parts):
        raise ConfigError(
            f"--cron {expr!r} is not a cron schedule: give five fields "
            "(minute hour day-of-month month day-of-week), e.g. \"0 2 * * *\", or @daily"
        )
    return text


def tag_for(job_path: Path) -> str:
    return f"{TAG} {job_path}"


def default_log(job_path: Path) -> Path:
    from actcache.logdir import log_dir

    return log_dir() / f"schedule-{job_path.stem}.log"


def cron_line(
    job_path: Path,
    cron: str,
    address: str | None,
    *,
    log: Path | None = None,
    gpus_per_worker: float | None = None,
    python: str | None = None,
) -> str:
    """One crontab line that submits ``job_path`` on ``cron`` and waits for the result;
    without an address, one that runs ``actcache cache`` on this machine."""
    job = job_path.resolve()
    args = [python or sys.executable, "-m", "actcache.cli"]
    if address is None:
        if gpus_per_worker is not None:
            raise ConfigError(
                "--gpus-per-worker applies to a Ray cluster: give --address too, or drop it "
                "for a local run"
            )
        args += ["cache", str(job)]
    else:
        args += ["submit", str(job), "--address", address, "--wait"]
    if gpus_per_worker is not None:
        args += ["--gpus-per-worker", f"{gpus_per_worker:g}"]
    target = (log or default_log(job)).expanduser()
    command = (f"mkdir -p {shlex.quote(str(target.parent))} && "
               f"{shlex.join(args)} >> {shlex.quote(str(target))} 2>&1")
    # In a crontab an unescaped % ends the command and starts its stdin.
    command = command.replace("%", r"\%")
    return f"{check_cron(cron)} {command} {tag_for(job)}"


def _crontab() -> str:
    binary = shutil.which("crontab")
    if binary is None:
        raise ConfigError(
            "no `crontab` program on PATH: install cron, or add the printed line to your "
            "scheduler by hand"
        )
    return binary


def read_crontab() -> str:
    """The user's crontab ('' when there is none yet)."""
    done = subprocess.run([_crontab(), "-l"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        if "no crontab" in (done.stderr or "").lower():
            return ""
        raise ConfigError(f"`crontab -l` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def merged(table: str, line: str) -> str:
    """``table`` with ``line`` replacing any line carrying the same tag (else appended)."""
    tag = line[line.index(TAG):]
    kept = [ln for ln in table.splitlines() if not ln.rstrip().endswith(tag)]
    return "\n".join([*kept, line]) + "\n"


def install(line: str) -> str:
    """Put ``line`` into the user's crontab idempotently; returns the new table."""
    table = merged(read_crontab(), line)
    done = subprocess.run([_crontab(), "-"], input=table, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise ConfigError(f"`crontab -` refused the table: {done.stderr.strip()}")
    return table
