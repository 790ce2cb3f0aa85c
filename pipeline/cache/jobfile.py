"""Job files: read a job YAML into a validated ``JobConfig``, with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from actcache.schemas.errors import ConfigError
from actcache.schemas.job import JobConfig


def load_job(path: str | os.PathLike[str], **overrides: Any) -> JobConfig:
    """Read and validate a job YAML; relative paths resolve against its folder."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"job file {str(file)!r} does not exist") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"job file {str(file)!r} is not UTF-8 text (byte {e.start})") from e
    except yaml.YAMLError as e:
        flat = " ".join(str(e).split())  # one line: the error names line and column itself
        raise ConfigError(f"job file {str(file)!r} is not valid YAML: {flat}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"job file {str(file)!r} must be a mapping of job fields")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    base = file.resolve().parent
    for key in ("inputs", "store", "model"):
        value = raw.get(key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            candidate = base / value
            # A model may also be a hub id ("org/name"): only rebase it when it exists here.
            if key != "model" or candidate.exists():
                raw[key] = os.path.normpath(candidate)
    return parse_job(raw, str(file))


def parse_job(raw: dict[str, Any], source: str = "job") -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "job"
        raise ConfigError(f"{source}: `{where}`: {first['msg']}") from e
