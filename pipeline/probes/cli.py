"""``actcache probe``: parse into a ``ProbeConfig``, call ``train_probes``, write, report.

Every option defaults to None, meaning "the schema's" (or the ``--config`` file's).
Heavy imports (torch, the store) happen inside the command so ``--help`` stays instant.
User errors (``UserError``) propagate to the ``actcache`` entry point, which prints them as
one line and exits 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from actcache.schemas.errors import ConfigError, flag_names, rename_fields
from actcache.schemas.probe import Precision, Task


def parse_layers(text: str) -> str | tuple[int, ...]:
    """``all`` or ``0,3,-1``."""
    if text.strip() == "all":
        return "all"
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"--layers must be 'all' or comma-separated ints like 0,3,-1, got {text!r}"
        ) from None


def build_config(config: Path | None, overrides: dict[str, Any]) -> Any:
    """The YAML file's values (if any), overridden by the options given, validated."""
    import yaml
    from pydantic import ValidationError

    from actcache.schemas.probe import ProbeConfig

    values: dict[str, Any] = {}
    if config is not None:
        try:
            loaded = yaml.safe_load(config.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read probe config {config}: {e.strerror}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"probe config {config} must be a mapping of fields")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "label" not in values:
        raise ConfigError("no label column: give --label COL (or `label:` in the --config file)")
    flags = typed_flags(overrides)
    try:
        return ProbeConfig(**values)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raw = str(err["msg"]).removeprefix("Value error, ")
        msg = rename_fields(raw, flags)
        if where in flags:
            prefix = "" if flags[where] in msg else f"{flags[where]}: "
        elif where:
            prefix = f"invalid probe config: {where}: "
        else:  # a cross-field error: name the options when it is about them
            prefix = "" if msg != raw else "invalid probe config: "
        raise ConfigError(prefix + msg) from None


#: Config fields as the options that set them are spelled on the command line.
FLAGS = {"label": "--label", "pooling": "--pooling", "layers": "--layers", "probes": "--probe",
         "task": "--task", "split_column": "--split-column", "test_fraction": "--test-fraction",
         "max_memory": "--max-memory", "precision": "--precision", "seed": "--seed",
         "out": "--out", "group_column": "--group-column", "eval_store": "--eval-store",
         "skip_positions": "--skip-positions", "epochs": "--epochs"}


def typed_flags(overrides: dict[str, Any]) -> dict[str, str]:
    """The flags for the fields given on the command line, and for the omitted ones whose
    fix is a flag (``pooling`` when the store has several)."""
    return {field: flag for field, flag in FLAGS.items()
            if overrides.get(field) is not None or field == "pooling"}


def probe_command(
    store: Annotated[str, typer.Argument(help="The store's URL (local path, s3://...).")],
    label: Annotated[str | None, typer.Option(help="Metadata column holding the labels.")] = None,
    config: Annotated[Path | None, typer.Option(help="A probe.yaml with ProbeConfig fields.")] = None,
    pooling: Annotated[str | None, typer.Option(help="Stored pooling to read.")] = None,
    layers: Annotated[str | None, typer.Option(help="'all' or indices like 0,3,-1.")] = None,
    probe: Annotated[list[str] | None, typer.Option(
        help="logistic, ridge or mean-diff; with --pooling tokens attentive, moment or "
             "token-logistic; repeat or comma-separate for several.")] = None,
    task: Annotated[Task | None, typer.Option(
        help="auto: regression (ridge on the number) when the label column is numeric with "
             "non-integer or more than 20 distinct values.")] = None,
    split_column: Annotated[str | None, typer.Option(
        help="Column with train/test/val values fixing the split.")] = None,
    test_fraction: Annotated[float | None, typer.Option(
        help="Fraction held out for test by a hash of the id.")] = None,
    group_column: Annotated[str | None, typer.Option(
        help="Column naming each row's group: also train per group, test on every group "
             "(transfer.csv, transfer.png).")] = None,
    eval_store: Annotated[str | None, typer.Option(
        help="Another store of the same model, layers and pooling: score the probes on its "
             "labelled rows (eval.csv).")] = None,
    max_memory: Annotated[str | None, typer.Option(
        help="Memory budget for activation blocks, e.g. 512MB.")] = None,
    precision: Annotated[Precision | None, typer.Option(
        help="auto: bf16 only where a timed step projects the whole fit faster than fp32.")
    ] = None,
    skip_positions: Annotated[int | None, typer.Option(
        help="Token probes: leading positions left out of every row (default: an image "
             "store's prefix tokens, else 0).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Token probes: AdamW epochs.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seeds control labels and splits.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for metrics, probes and plot.")] = None,
) -> None:
    """Train probes on every requested layer of a store at once, out-of-core."""
    kinds = None if probe is None else tuple(
        p.strip() for item in probe for p in item.split(",") if p.strip())
    cfg = build_config(config, {
        "label": label, "pooling": pooling,
        "layers": None if layers is None else parse_layers(layers),
        "probes": kinds, "task": task, "split_column": split_column,
        "test_fraction": test_fraction, "group_column": group_column, "eval_store": eval_store,
        "max_memory": max_memory, "precision": precision, "seed": seed,
        "skip_positions": skip_positions, "epochs": epochs,
        "out": None if out is None else str(out),
    })
    from actcache.probes._report import print_report, write_outputs
    from actcache.probes.api import train_probes
    from actcache.terminal import console

    overrides = {"pooling": pooling, "layers": layers, "probes": probe, "task": task,
                 "label": label, "split_column": split_column, "group_column": group_column,
                 "eval_store": eval_store}
    with flag_names(typed_flags(overrides)):
        result = train_probes(store, cfg)
    folder = write_outputs(result, cfg.out)
    print_report(result, console(), folder)
