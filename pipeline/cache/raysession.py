"""The Ray session of a caching run: join the cluster this runs in, or start and stop a local one.

Everything that knows Ray's session (its address rules, where its logs are) is here,
through Ray's public API only, so the driver asks for "a session for this run" and an
in-process run never imports Ray.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from actcache.cache.runlog import note, ray_output_to, run_log, sigint_deferred
from actcache.schemas.errors import ConfigError


def connect_ray() -> bool:
    """Join the Ray cluster this runs in, else start a local instance; True when started."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ConfigError(
            f"RAY_ADDRESS={address} is a dashboard address: submit the job with "
            f"`actcache submit JOB.yaml --address {address}` instead"
        )
    # Outside a cluster this starts a local instance; the dashboard is not needed for it.
    # The actors' output (model loading bars, warnings) stays in Ray's session logs.
    ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
    return True


@contextmanager
def ray_session(run_id: str) -> Iterator[None]:
    """Ray, connected, for the length of the block; its messages go to the run's log file.

    A local Ray instance started here is stopped here too, whatever ends the run: a
    Python caller who wants one Ray instance across runs starts it first (``ray.init()``).
    """
    import ray

    log = run_log(run_id)
    with ray_output_to(log):
        started = False
        try:
            started = connect_ray()
            note(log, f"Ray session logs (the actors' output): {session_dir()}")
            yield
        finally:
            if started:
                with sigint_deferred():
                    ray.shutdown()


def session_dir() -> str:
    """The folder of this Ray session (its ``logs`` hold the actors' output).

    Ray's public runtime context names the node's temp folder and the session; the
    session's folder is the one inside the other (as Ray lays it out), on the node where
    this driver runs.
    """
    import ray

    ctx = ray.get_runtime_context()
    return os.path.join(ctx.get_temp_dir(), ctx.get_session_name())
