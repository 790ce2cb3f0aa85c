"""Pure data shared by the stages: configs, the store manifest, run records, errors.

No I/O, no torch, no ray.
"""

from actcache.schemas.errors import (
    ActcacheError,
    ColumnNotFoundError,
    ConfigError,
    IdNotFoundError,
    InputDataError,
    InputFileNotFoundError,
    JobSubmissionError,
    LayerNotFoundError,
    LeaseHeldError,
    LeaseLostError,
    MediaFileError,
    ModelLoadError,
    OverflowStorageError,
    PoolingNotFoundError,
    ProbeDataError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreNotFoundError,
    UserError,
)

__all__ = [
    "ActcacheError",
    "ColumnNotFoundError",
    "ConfigError",
    "IdNotFoundError",
    "InputDataError",
    "InputFileNotFoundError",
    "JobSubmissionError",
    "LayerNotFoundError",
    "LeaseHeldError",
    "LeaseLostError",
    "MediaFileError",
    "ModelLoadError",
    "OverflowStorageError",
    "PoolingNotFoundError",
    "ProbeDataError",
    "StoreIncompleteError",
    "StoreMismatchError",
    "StoreNotFoundError",
    "UserError",
]
