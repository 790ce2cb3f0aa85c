"""The ``actcache`` command line. Commands are thin: parse, call one pipeline function.

Heavy imports (torch, ray, transformers) happen inside the commands so ``--help`` is
instant. User errors exit 2 with one ``error: ...`` line; faults of the system exit 1
with the traceback in a log file whose path the line gives.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from actcache.logdir import log_dir
from actcache.ops import cli as ops_cli
from actcache.probes import cli as probes_cli
from actcache.query import cli as query_cli
from actcache.schemas.errors import UserError
from actcache.similarity import cli as compare_cli

app = typer.Typer(
    name="actcache",
    help="Cache per-layer hidden states into Zarr stores, train probes, query activations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from actcache import __version__

        typer.echo(f"actcache {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Cache per-layer hidden states into Zarr stores, train probes, query activations."""


@app.command()
def cache(
    job: Annotated[Path, typer.Argument(help="The job YAML.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an incompatible existing store.")
    ] = False,
    repair: Annotated[
        bool, typer.Option("--repair", help="Recompute the units whose chunks fail their checksum.")
    ] = False,
    in_process: Annotated[
        bool, typer.Option(
            "--in-process",
            help="One worker in this process, without Ray: starts in seconds; for a job "
                 "that fits this machine (one worker).")
    ] = False,
) -> None:
    """Cache the hidden states a job asks for into its store (resumes and appends)."""
    from actcache.cache.driver import load_job, run_job
    from actcache.schemas.errors import RunInterrupted

    try:
        run_job(load_job(job), overwrite=overwrite, dry_run=dry_run, echo=typer.echo,
                repair=repair, inline=in_process)
    except RunInterrupted as e:
        # Said here: click turns a KeyboardInterrupt into a bare exit status 130.
        typer.echo(str(e), err=True)
        raise typer.Exit(130) from None


@app.command()
def info(
    store: Annotated[str, typer.Argument(help="Store URL (path, s3://...).")],
    verify: Annotated[
        bool, typer.Option("--verify", help="Read every chunk; name each corrupt unit.")
    ] = False,
) -> None:
    """Show a store's manifest, rows, layers, poolings, bytes and completeness."""
    from actcache.info import describe

    typer.echo(describe(store))
    if verify:
        from actcache.cache.verify import verify as check

        typer.echo(check(store))


# The other stages' commands. Their modules import only typer and the schemas (heavy
# imports wait inside each command), so registering them keeps `--help` instant.
app.command("probe")(probes_cli.probe_command)
app.command("query")(query_cli.query_command)
app.command("compare")(compare_cli.compare_command)
app.command("plot")(compare_cli.plot_command)
ops_cli.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    try:
        # Outside standalone mode a command's `typer.Exit(n)` comes back as the return value.
        code = app(args=argv, standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        return int(code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt as e:
        typer.echo(str(e) or "interrupted", err=True)
        return 130
    except typer.TyperException as e:
        # Usage errors (unknown option or command, a value of the wrong type): click's own
        # message, with its suggestions, and click's exit status (2); no log file.
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"error: {e.format_message()}", err=True)
        return int(getattr(e, "exit_code", 2))
    except Exception as e:
        folder = log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"actcache-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
        log.write_text(traceback.format_exc())
        typer.echo(f"error: internal error ({type(e).__name__}: {e}); traceback in {log}", err=True)
        return 1
    return code if isinstance(code, int) else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
