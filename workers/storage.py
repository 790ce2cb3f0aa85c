"""Opening a store's zarr group at any fsspec URL, inside the process that uses it.

s3fs filesystems are tied to the event loop of the process that made them, so each
actor and the driver open their own.
"""

from __future__ import annotations

import os
from typing import Any

import zarr

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
)


def storage_env() -> dict[str, str]:
    return {k: os.environ[k] for k in STORAGE_ENV_VARS if k in os.environ}


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def open_group(url: str, mode: str = "r", storage_options: dict[str, Any] | None = None) -> Any:
    if is_local(url):
        return zarr.open_group(local_path(url), mode=mode, zarr_format=3)  # type: ignore[arg-type]
    return zarr.open_group(url, mode=mode, zarr_format=3, storage_options=storage_options or {})  # type: ignore[arg-type]


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for the store root."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/")
