"""``actcache cache --dry-run``: the plan, the bytes and the workers' self-check; nothing written."""

from __future__ import annotations

from typing import Any

from actcache.cache.fit import estimate_bytes
from actcache.cache.lifecycle import plan_run
from actcache.cache.plan import Plan
from actcache.cache.wiring import Described, new_worker
from actcache.schemas.job import JobConfig
from actcache.schemas.store import Manifest


def dry_run(job: JobConfig, described: Described, overwrite: bool,
            storage_options: dict[str, Any] | None, run_id: str, echo: Any) -> Plan:
    """Print what a run would do, the self-check run here (no store is needed for it)."""
    _, plan = plan_run(job, described.manifest, described.inputs, overwrite, storage_options,
                       run_id)
    check = new_worker(None, described.manifest, plan).check() if plan.tasks else None
    nbytes = estimate_bytes(described.manifest, plan, described.adapter)
    print_plan(echo, job, described.manifest, plan, nbytes, check)
    return plan


def print_plan(echo: Any, job: JobConfig, manifest: Manifest, plan: Plan, nbytes: int,
               check: dict[str, Any] | None) -> None:
    echo(f"store:    {job.store}")
    echo(f"model:    {manifest.model.name} ({manifest.model.model_type}, "
         f"{manifest.model.num_hidden_layers} blocks, hidden {manifest.model.hidden_size})")
    echo(f"layers:   {', '.join(map(str, manifest.layers))}")
    echo(f"pooling:  {', '.join(manifest.poolings)}  dtype: {manifest.dtype}  "
         f"max_length: {manifest.max_length}")
    echo(f"rows:     {plan.rows} in input; {plan.added} new, {plan.updated} edited, "
         f"{plan.skipped} unchanged, {plan.missing} missing from input")
    echo(f"units:    {len(plan.tasks)} to compute ({job.rows_per_unit} rows each)")
    echo(f"bytes:    {nbytes / 1e6:.1f} MB to write (uncompressed)")
    if check is not None:
        echo(f"check:    padded batch = each input alone (max rel. error {check['max_rel_error']:.2g}"
             f" over {check['examples']} inputs) with {check['padding_side']} padding, "
             f"{check['positions']} positions")
