"""From a job to a caching worker in this process: one path for the driver, benchmarks and tests.

describe (the model's config and tokenizer, no weights) -> manifest -> plan -> worker
(given the self-check's inputs) -> self-check -> store made or grown, the check recorded.
The in-process run (``actcache cache --in-process``), the benchmarks and the tests all
call ``in_process_worker``; a Ray run takes the same steps, with actors for the worker.
Assembled by hand in each place, these steps drifted: workers skipped their self-check,
and the check's inputs were written into a store's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actcache import __version__
from actcache.cache.create import CODEC, chunk_rows_for
from actcache.cache.inputs import InputRows, load_inputs
from actcache.cache.plan import Plan, empty_stored, make_plan
from actcache.schemas.errors import ConfigError
from actcache.schemas.job import JobConfig, ModelDtype
from actcache.schemas.store import Manifest, ModelInfo, WorkerSpec
from actcache.workers.media import IMAGE_BACKEND
from actcache.workers.model import (
    hidden_size,
    load_config,
    resolve_layers,
    resolve_model_dtype,
    weights_fingerprint,
)


def describe_model(job: JobConfig) -> tuple[ModelInfo, Any, Any]:
    """Resolve the model and its tokenizer without loading weights (fast, before Ray)."""
    from actcache.workers.adapters import make_adapter, model_side, side_layers

    config = load_config(job.model, job.revision, job.trust_remote_code)
    adapter = make_adapter(job, config, job.max_length, job.truncation_side)
    side = model_side(job, config)
    config = adapter.encoder_config(config)
    check_media_job(job, config, adapter)
    weights, commit = weights_fingerprint(job.model, job.revision)
    info = ModelInfo(
        name=job.model,
        revision=commit or job.revision,
        weights_hash=weights,
        model_type=str(getattr(config, "model_type", "unknown")),
        num_hidden_layers=side_layers(config, side),
        hidden_size=hidden_size(config),
        tokenizer=adapter.description,
        padding_side=adapter.padding_side,
    )
    return info, config, adapter


def check_media_job(job: JobConfig, config: Any, adapter: Any) -> None:
    """Refuse, before anything runs, what an image or audio model cannot give."""
    if job.final_norm:
        from actcache.workers.final_norm import check_final_norm

        check_final_norm(config)
    if "first" in job.pooling and not adapter.defines_first:
        raise ConfigError(
            f"a {getattr(config, 'model_type', 'this')} model has no class token, so `first` "
            "pooling is not defined for it; use mean or tokens"
        )


def build_manifest(job: JobConfig, info: ModelInfo, max_length: int,
                   side: str | None = None, prefix: int = 0) -> Manifest:
    layers = resolve_layers(job.layers, info.num_hidden_layers)
    # `model_dtype: auto` is recorded as the dtype it resolved to: a store is compared,
    # and its values made, by the dtype that actually ran.
    model_dtype = resolve_model_dtype(job.model, job.revision, job.trust_remote_code,
                                      job.model_dtype.value)
    job = job.model_copy(update={"model_dtype": ModelDtype(model_dtype)})
    return Manifest(
        actcache_version=__version__,
        model=info,
        layers=layers,
        poolings=tuple(p.value for p in job.pooling),
        dtype=job.dtype.value,
        model_dtype=model_dtype,
        max_length=max_length,
        truncation_side=job.truncation_side,
        text_column=job.input_column,
        id_column=job.id_column,
        rows_per_unit=job.rows_per_unit,
        chunk_rows=chunk_rows_for(job.rows_per_unit),
        codec=CODEC,
        job=job.model_dump(mode="json"),
        modality=job.modality,
        prefix_tokens=prefix,
        final_norm=job.final_norm,
        processor_backend=IMAGE_BACKEND if job.modality == "image" else None,
        side=side,
    )


@dataclass
class Described:
    """A job resolved before any weight loads: what its store records, and its inputs."""

    manifest: Manifest
    adapter: Any
    inputs: InputRows


def describe_job(job: JobConfig, storage_options: dict[str, Any] | None = None) -> Described:
    """The job's manifest (model resolved, first row as rendered) and its input rows."""
    info, _config, adapter = describe_model(job)
    manifest = build_manifest(job, info, adapter.max_length, adapter.side, adapter.prefix)
    inputs = load_inputs(job.inputs, job.input_column, job.id_column, storage_options,
                         job.modality, pair_column=job.text_pair_column)
    # Note what the model sees of the first row when a template reshapes the text.
    rendered = adapter.render(inputs.texts[0]) if inputs.texts else None
    return Described(manifest.model_copy(update={"rendered_example": rendered}), adapter, inputs)


def worker_spec(manifest: Manifest, plan: Plan) -> WorkerSpec:
    """What workers start from: the manifest and the self-check's inputs (a few of this
    run's). Only workers get those inputs; the store's manifest records the check's result.
    """
    from actcache.workers.selfcheck import pick_inputs

    inputs = pick_inputs([x for task in plan.tasks for x in task.inputs])
    return WorkerSpec(manifest=manifest, check_inputs=tuple(inputs))


def new_worker(store: str | None, manifest: Manifest, plan: Plan,
               storage_options: dict[str, Any] | None = None, worker_cls: type | None = None,
               threads: int | None = None) -> Any:
    """A caching worker in this process for ``plan`` (``store`` None: it only checks itself)."""
    from actcache.workers.actor import CachingWorker

    cls = worker_cls or CachingWorker
    return cls(store, worker_spec(manifest, plan), storage_options, threads)


@dataclass
class InProcess:
    """A worker in this process, checked, and its store ready for ``plan``'s units."""

    worker: Any
    plan: Plan
    manifest: Manifest
    """The store's manifest, with the worker's self-check record."""
    group: Any
    fresh: bool


def in_process_worker(
    job: JobConfig,
    *,
    storage_options: dict[str, Any] | None = None,
    described: Described | None = None,
    plan: Plan | None = None,
    fresh: bool = True,
    run_id: str = "local",
    worker_cls: type | None = None,
    threads: int | None = None,
) -> InProcess:
    """Wire ``job`` to a caching worker in this process, self-checked, its store ready.

    Without ``plan`` every input row is planned into a fresh store (what benchmarks and
    tests want); the driver passes the plan it made against the store under its lease.
    The worker checks itself before the store is touched, so a refused model leaves the
    store as it was; the check's record goes into the store's manifest.
    """
    from actcache.cache.lifecycle import start_store

    described = described or describe_job(job, storage_options)
    if plan is None:
        plan, fresh = make_plan(described.inputs, empty_stored(), job.rows_per_unit, run_id), True
    worker = new_worker(job.store, described.manifest, plan, storage_options, worker_cls, threads)
    manifest = described.manifest.model_copy(update={"self_check": worker.check()})
    group, _ = start_store(job.store, manifest, plan.n_units, fresh, storage_options)
    return InProcess(worker, plan, manifest, group, fresh)
