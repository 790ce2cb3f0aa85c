"""Opening a store's zarr group at any fsspec URL, inside the process that uses it.

s3fs filesystems are tied to the event loop of the process that made them, so each
actor and the driver open their own.
"""

from __future__ import annotations

import os
from typing import Any

# Credentials and endpoints an actor needs to reach the same object store as the driver.
# They travel in the actor's environment only, never into the store.
STORAGE_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "ACTCACHE_S3_MAX_ATTEMPTS",
    "ACTCACHE_S3_READ_TIMEOUT_S",
)

# Transient object-store errors (connection resets, read timeouts, 500, 503 SlowDown) are
# retried with exponential backoff and jitter by botocore's "standard" retry mode; a body
# cut short is retried by s3fs. Permanent ones (403, no such bucket) are not retried.
S3_MAX_ATTEMPTS = 10
S3_READ_TIMEOUT_S = 60.0
S3_CONNECT_TIMEOUT_S = 10.0


def storage_env() -> dict[str, str]:
    return {k: os.environ[k] for k in STORAGE_ENV_VARS if k in os.environ}


def is_local(url: str) -> bool:
    """Whether ``url`` is a path on this machine (no scheme, or ``file://``)."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def with_retries(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` plus botocore's retry and timeout settings for s3:// URLs.

    The environment (``ACTCACHE_S3_MAX_ATTEMPTS``, ``ACTCACHE_S3_READ_TIMEOUT_S``) tunes
    them for every process of a run; explicit ``config_kwargs`` win over both.
    """
    options = dict(storage_options or {})
    if not url.startswith(("s3://", "s3a://")):
        return options
    config = {
        "retries": {
            "mode": "standard",
            "max_attempts": int(os.environ.get("ACTCACHE_S3_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS),
        },
        "read_timeout": float(os.environ.get("ACTCACHE_S3_READ_TIMEOUT_S") or S3_READ_TIMEOUT_S),
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
    }
    options["config_kwargs"] = {**config, **options.get("config_kwargs", {})}
    return options


def open_group(url: str, mode: str = "r", storage_options: dict[str, Any] | None = None) -> Any:
    # zarr on first use: the CLI's job checks (``is_local``) run before any store is opened.
    import zarr

    if is_local(url):
        return zarr.open_group(local_path(url), mode=mode, zarr_format=3)  # type: ignore[arg-type]
    options = with_retries(url, storage_options)
    return zarr.open_group(url, mode=mode, zarr_format=3, storage_options=options)  # type: ignore[arg-type]


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for the store root."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **with_retries(url, storage_options))
    return fs, path.rstrip("/")


def check_access(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail fast, in one line, where an object store refuses for good (no bucket, 403)."""
    from actcache.schemas.errors import StorageAccessError

    if not url.startswith(("s3://", "s3a://")):
        return
    fs, path = filesystem(url, storage_options)
    bucket = path.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError as e:
        raise StorageAccessError(
            f"bucket {bucket!r} of {url} does not exist; create it or fix the URL"
        ) from e
    except PermissionError as e:
        raise StorageAccessError(
            f"access to {url} was denied (403); check the AWS credentials "
            "(AWS_ACCESS_KEY_ID, AWS_PROFILE) and the bucket's policy"
        ) from e
