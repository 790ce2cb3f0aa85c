"""Submitting caching jobs to a Ray cluster through the Ray Jobs API, and watching them.

A submitted job runs ``python -m actcache.cli cache job.yaml`` on the cluster. The
job's runtime environment carries:

- ``working_dir``: a folder holding only ``job.yaml``, the job as validated here with
  every relative path resolved against the YAML's own folder (so the job means on the
  cluster what it means here; local paths must then be visible to every node: one
  machine, or a shared filesystem, else use ``s3://``);
- ``py_modules``: this process's own ``actcache`` package, copied as a plain folder.
  Shipping the code rather than a pip requirement keeps the cluster's code identical to
  the submitter's without a package index or a per-job virtualenv; the third-party
  dependencies (torch, transformers, zarr, ...) come from the cluster's image
  (docker/Dockerfile), where a pip requirement would reinstall torch for every job;
- ``--gpus-per-worker`` becomes the shipped job's ``gpus_per_worker``. The GPUs belong
  to the caching actors, not to the entrypoint (the driver only plans and records), so
  the value is read by the driver's actor pool rather than passed as entrypoint
  resources. Storage credentials are not forwarded: a runtime env is shown by the
  dashboard, so the cluster brings its own (``AWS_*`` in its environment).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from actcache.schemas.errors import ConfigError, JobSubmissionError
from actcache.schemas.job import JobConfig
from actcache.workers.storage import is_local

JOB_FILE = "job.yaml"
ENTRYPOINT = f"python -m actcache.cli cache {JOB_FILE}"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: With the package-dir mapping, these subpackages live beside the root folder in a
#: source checkout, so copying the root folder alone would miss them.
_MAPPED_SUBPACKAGES = ("workers", "schemas")

#: Ray's client logs every upload and websocket at INFO; the command prints what matters.
_CHATTY_LOGGERS = (
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
)

Echo = Callable[..., Any]


def resolve_address(address: str | None) -> str:
    """The Ray dashboard URL from ``--address`` or ``RAY_ADDRESS``."""
    value = address or os.environ.get("RAY_ADDRESS")
    if not value:
        raise ConfigError(
            "no Ray cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS "
            "to the dashboard URL"
        )
    if not value.startswith(("http://", "https://")):
        raise ConfigError(
            f"address {value!r} is not a Ray dashboard URL: give http://HEAD:8265 "
            "(the dashboard port, not the GCS port 6379)"
        )
    return value.rstrip("/")


def client(address: str | None) -> Any:
    """A JobSubmissionClient for the dashboard at ``address`` (a clear error when unreachable)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except AuthenticationError as e:
        raise JobSubmissionError(
            f"the Ray cluster at {url} requires a token: set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
        ) from e
    except (ConnectionError, RuntimeError) as e:
        reason = str(e).splitlines()[0].rstrip(".")
        raise JobSubmissionError(
            f"cannot reach the Ray dashboard at {url}: {reason}; "
            "check that the head is running with its dashboard on that port"
        ) from e


def shipped_job(job: JobConfig, gpus_per_worker: float | None = None) -> dict[str, Any]:
    """The job as shipped: validated, paths already absolute, defaults left to the schema.

    ``--gpus-per-worker``, when given, overrides the job's ``gpus_per_worker``.
    """
    raw = job.model_dump(mode="json", exclude_unset=True)
    if gpus_per_worker is not None:
        if gpus_per_worker <= 0:
            raise ConfigError(f"--gpus-per-worker must be positive, got {gpus_per_worker}")
        raw["gpus_per_worker"] = gpus_per_worker
        from actcache.cache.driver import parse_job

        parse_job(raw, "--gpus-per-worker")
    return raw


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def local_paths(job: JobConfig) -> list[str]:
    """The job's paths that only this machine may see (no URL scheme)."""
    return [v for v in (job.inputs, job.store) if is_local(v)]


def package_copy(dest: Path) -> Path:
    """Copy the imported ``actcache`` package (sources only) to ``dest/actcache``."""
    import actcache

    root = Path(actcache.__path__[0])
    target = dest / "actcache"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    shutil.copytree(root, target, ignore=ignore)
    for name in _MAPPED_SUBPACKAGES:
        spec = importlib.util.find_spec(f"actcache.{name}")
        locations = list(spec.submodule_search_locations or []) if spec else []
        if locations and not (target / name).exists():
            shutil.copytree(locations[0], target / name, ignore=ignore)
    return target


@dataclass
class Submission:
    """What ``submit`` sends: entrypoint, runtime env, metadata and an id."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str
    job: dict[str, Any] = field(default_factory=dict)


def submission_id(job_path: Path) -> str:
    stem = re.sub(r"[^a-zA-Z0-9]+", "-", job_path.stem).strip("-").lower() or "job"
    return f"actcache-{stem}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"


@contextmanager
def prepared(
    job_path: Path,
    job: JobConfig,
    gpus_per_worker: float | None = None,
    ship_package: bool = True,
) -> Iterator[Submission]:
    """Build the submission in a temporary folder that lives while the job is uploaded."""
    raw = shipped_job(job, gpus_per_worker)
    with tempfile.TemporaryDirectory(prefix="actcache-submit-") as tmp:
        work = Path(tmp) / "job"
        work.mkdir()
        (work / JOB_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
        runtime_env: dict[str, Any] = {"working_dir": str(work)}
        if ship_package:
            runtime_env["py_modules"] = [str(package_copy(Path(tmp) / "pkg"))]
        metadata = {"actcache_job": str(job_path), "actcache_store": job.store}
        yield Submission(ENTRYPOINT, runtime_env, metadata, submission_id(job_path), raw)


def submit(
    job_path: Path,
    address: str | None,
    *,
    gpus_per_worker: float | None = None,
    ship_package: bool = True,
    echo: Echo = print,
) -> tuple[Any, str]:
    """Submit the job at ``job_path``; returns (client, job id)."""
    from actcache.cache.driver import load_job

    job = load_job(job_path)
    jobs = client(address)
    url = resolve_address(address)
    if not is_loopback(url):
        for path in local_paths(job):
            echo(f"note: {path} is a local path: every node of the cluster must see it "
                 "(a shared filesystem), or use s3://", err=True)
    with prepared(job_path, job, gpus_per_worker, ship_package) as sub:
        try:
            job_id = jobs.submit_job(
                entrypoint=sub.entrypoint,
                submission_id=sub.submission_id,
                runtime_env=sub.runtime_env,
                metadata=sub.metadata,
            )
        except RuntimeError as e:
            raise JobSubmissionError(f"the cluster at {url} refused the job: {e}") from e
    return jobs, job_id


def status(jobs: Any, job_id: str) -> Any:
    """JobDetails of ``job_id`` (an error naming the id when the cluster does not know it)."""
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise JobSubmissionError(
                f"no job {job_id!r} on this cluster; `actcache jobs list` shows the jobs"
            ) from e
        raise


def logs(jobs: Any, job_id: str) -> str:
    status(jobs, job_id)
    return str(jobs.get_job_logs(job_id))


def follow(jobs: Any, job_id: str, echo: Echo = print) -> str:
    """Print the job's logs as they come until it ends; returns everything printed."""
    status(jobs, job_id)
    seen: list[str] = []

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            seen.append(chunk)
            echo(chunk, nl=False)

    asyncio.run(tail())
    return "".join(seen)


def wait(jobs: Any, job_id: str, poll_s: float = 0.5) -> Any:
    """Block until the job reaches a terminal status; returns its JobDetails."""
    while True:
        info = status(jobs, job_id)
        if str(info.status) in TERMINAL or getattr(info.status, "value", "") in TERMINAL:
            return info
        time.sleep(poll_s)


def error_line(log_text: str, message: str | None) -> str:
    """The job's own ``error: ...`` line, else the last line of Ray's message."""
    for line in reversed(log_text.splitlines()):
        if line.startswith("error: "):
            return line[len("error: "):]
    lines = [ln for ln in (message or "").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no error message"


def status_name(info: Any) -> str:
    return str(getattr(info.status, "value", info.status))


def stop(jobs: Any, job_id: str) -> bool:
    status(jobs, job_id)
    return bool(jobs.stop_job(job_id))


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def job_rows(jobs: Any) -> list[dict[str, str]]:
    """One row per job the cluster knows, newest first."""
    rows = []
    for info in sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0, reverse=True):
        meta = info.metadata or {}
        rows.append({
            "job_id": str(info.submission_id or info.job_id),
            "status": status_name(info),
            "started": _when(info.start_time),
            "ended": _when(info.end_time),
            "store": meta.get("actcache_store", "-"),
            "entrypoint": str(info.entrypoint),
        })
    return rows


def describe(info: Any) -> str:
    meta = info.metadata or {}
    lines = [
        f"job:        {info.submission_id or info.job_id}",
        f"status:     {status_name(info)}",
        f"entrypoint: {info.entrypoint}",
        f"started:    {_when(info.start_time)}",
        f"ended:      {_when(info.end_time)}",
    ]
    if "actcache_job" in meta:
        lines.append(f"job file:   {meta['actcache_job']}")
        lines.append(f"store:      {meta.get('actcache_store', '-')}")
    if info.message:
        lines.append(f"message:    {str(info.message).splitlines()[0]}")
    return "\n".join(lines)
