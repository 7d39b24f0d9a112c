"""The data layer: IDX files, data sources, splits and the tensor views a trainer needs.

Imports only numpy, torch and the standard library (torchvision lazily, for downloads and
published checksums), so it stays usable outside the orchestration layer.
"""

from vae_core.data.errors import (
    ChecksumError,
    DataError,
    DatasetMismatchError,
    IdxFormatError,
    ProcessedDataError,
    SourceError,
    SourceUnavailable,
    SplitError,
)
from vae_core.data.idx import read_idx, validate_pair, write_idx
from vae_core.data.sources import (
    DATASETS,
    MANIFEST_NAME,
    RAW_FILES,
    SOURCES,
    fetch_raw,
    locate_raw_files,
    published_md5,
    read_manifest,
)
from vae_core.data.splits import (
    DatasetSplits,
    array_stats,
    load_processed,
    load_raw,
    load_split_indices,
    load_splits,
    make_splits,
    save_arrays,
    save_processed,
    split_arrays,
    split_stats,
)

__all__ = [
    "DATASETS",
    "MANIFEST_NAME",
    "RAW_FILES",
    "SOURCES",
    "ChecksumError",
    "DataError",
    "DatasetMismatchError",
    "DatasetSplits",
    "IdxFormatError",
    "ProcessedDataError",
    "SourceError",
    "SourceUnavailable",
    "SplitError",
    "array_stats",
    "fetch_raw",
    "load_processed",
    "load_raw",
    "load_split_indices",
    "load_splits",
    "locate_raw_files",
    "make_splits",
    "published_md5",
    "read_idx",
    "read_manifest",
    "save_arrays",
    "save_processed",
    "split_arrays",
    "split_stats",
    "validate_pair",
    "write_idx",
]
