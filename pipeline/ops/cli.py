"""Commands that run actcache as a cluster service: submit, jobs, schedule, runs.

Registered on the main app by ``register(app)``. Failed jobs exit 1 through
``SystemExit`` (which the entry point turns into the exit status); user mistakes raise
``UserError`` subclasses (exit 2, one ``error:`` line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from actcache.schemas.errors import ConfigError

AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="Ray dashboard URL, http://HEAD:8265 (default: $RAY_ADDRESS)."),
]
GpusOpt = Annotated[
    float | None,
    typer.Option("--gpus-per-worker", help="GPUs each caching actor reserves (may be fractional)."),
]

jobs_app = typer.Typer(help="List, inspect, follow and stop submitted jobs.", no_args_is_help=True)


def submit_command(
    job: Annotated[Path, typer.Argument(help="The job YAML.")],
    address: AddressOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the logs; exit with the job's status.")] = False,
    gpus_per_worker: GpusOpt = None,
    ship_package: Annotated[
        bool,
        typer.Option("--ship-package/--no-ship-package",
                     help="Ship this actcache's code with the job (else the cluster's own)."),
    ] = True,
) -> None:
    """Submit a caching job to a Ray cluster through the Ray Jobs API; prints the job id."""
    from actcache.ops import submit as ops

    jobs, job_id = ops.submit(job, address, gpus_per_worker=gpus_per_worker,
                              ship_package=ship_package, echo=typer.echo)
    typer.echo(job_id)
    if not wait:
        typer.echo(f"follow it with: actcache jobs logs {job_id} --follow", err=True)
        return
    ops.follow(jobs, job_id, echo=typer.echo)
    info = ops.wait(jobs, job_id)
    state = ops.status_name(info)
    if state == "SUCCEEDED":
        typer.echo(f"job {job_id} succeeded", err=True)
        return
    line = ops.error_line(ops.logs(jobs, job_id), info.message)
    typer.echo(f"error: job {job_id} {state.lower()}: {line}", err=True)
    raise SystemExit(1)


@jobs_app.command("list")
def jobs_list(address: AddressOpt = None) -> None:
    """The cluster's jobs, newest first."""
    from actcache.ops import submit as ops

    rows = ops.job_rows(ops.client(address))
    if not rows:
        typer.echo("no jobs")
        return
    head = ("job_id", "status", "started", "ended", "store")
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in head]
    for cells in [dict(zip(head, head, strict=True)), *rows]:
        typer.echo("  ".join(str(cells[h]).ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())


@jobs_app.command("status")
def jobs_status(
    job_id: Annotated[str, typer.Argument(help="The job id `submit` printed.")],
    address: AddressOpt = None,
) -> None:
    """A job's status, times, job file and store."""
    from actcache.ops import submit as ops

    typer.echo(ops.describe(ops.status(ops.client(address), job_id)))


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="The job id `submit` printed.")],
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """A job's logs (its driver's stdout and stderr)."""
    from actcache.ops import submit as ops

    jobs = ops.client(address)
    if follow:
        ops.follow(jobs, job_id, echo=typer.echo)
    else:
        typer.echo(ops.logs(jobs, job_id), nl=False)


@jobs_app.command("stop")
def jobs_stop(
    job_id: Annotated[str, typer.Argument(help="The job id `submit` printed.")],
    address: AddressOpt = None,
) -> None:
    """Ask the cluster to stop a job."""
    from actcache.ops import submit as ops

    stopped = ops.stop(ops.client(address), job_id)
    typer.echo(f"job {job_id}: {'stop requested' if stopped else 'already finished'}")


def schedule_command(
    job: Annotated[Path, typer.Argument(help="The job YAML.")],
    cron: Annotated[str, typer.Option("--cron", help='Cron schedule, e.g. "0 2 * * *".')],
    address: Annotated[str | None, typer.Option(
        "--address", help="Ray dashboard URL, http://HEAD:8265 (default: $RAY_ADDRESS); "
        "without one the line runs `actcache cache` on this machine.")] = None,
    install: Annotated[bool, typer.Option("--install", help="Put the line into your crontab.")] = False,
    kubernetes: Annotated[
        bool, typer.Option("--kubernetes", help="Print a CronJob creating a KubeRay RayJob.")
    ] = False,
    image: Annotated[str | None, typer.Option("--image", help="Worker image (Kubernetes).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Ray worker pods (Kubernetes).")] = 1,
    namespace: Annotated[str | None, typer.Option("--namespace", help="Kubernetes namespace.")] = None,
    gpus_per_worker: GpusOpt = None,
    log: Annotated[Path | None, typer.Option("--log", help="Where cron appends the output.")] = None,
) -> None:
    """Run a job on a schedule: a crontab line (printed or installed) or Kubernetes YAML."""
    from actcache.cache.driver import load_job
    from actcache.ops import schedule as cron_ops
    from actcache.ops.submit import local_paths, resolve_address, shipped_job

    if install and kubernetes:
        raise ConfigError("--install and --kubernetes exclude each other: pick one")
    spec = load_job(job)
    if kubernetes:
        from actcache.ops import k8s

        for path in local_paths(spec):
            typer.echo(f"note: {path} is a local path: every pod must see it (mount it), "
                       "or use s3://", err=True)
        typer.echo(k8s.render(job.stem, shipped_job(spec, gpus_per_worker), cron_ops.check_cron(cron),
                              image=image or k8s.IMAGE, workers=workers,
                              gpus_per_worker=gpus_per_worker, namespace=namespace), nl=False)
        return
    # No cluster named: the line runs `actcache cache` on this machine.
    cluster = resolve_address(address) if address or os.environ.get("RAY_ADDRESS") else None
    line = cron_ops.cron_line(job, cron, cluster, log=log,
                              gpus_per_worker=gpus_per_worker)
    if install:
        cron_ops.install(line)
        typer.echo(f"installed in your crontab:\n{line}")
    else:
        typer.echo(line)


def runs_command(
    store: Annotated[str, typer.Argument(help="Store URL (path, s3://...).")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list instead of a table.")] = False,
) -> None:
    """The store's run history: one line per run, crashed runs marked."""
    from actcache.ops.runs import history, table

    rows = history(store)
    typer.echo(json.dumps(rows, indent=1) if as_json else table(rows))


def register(app: typer.Typer) -> None:
    """Add submit, jobs, schedule and runs to the ``actcache`` app."""
    app.command("submit")(submit_command)
    app.add_typer(jobs_app, name="jobs")
    app.command("schedule")(schedule_command)
    app.command("runs")(runs_command)
