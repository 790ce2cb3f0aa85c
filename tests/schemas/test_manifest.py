"""The manifest as older actcache versions wrote it still validates, with the schema's defaults."""

from __future__ import annotations

import pytest

from actcache.schemas.job import JobConfig
from actcache.schemas.store import FORMAT_VERSION, Manifest, WorkerSpec

# The keys the first format's manifest had; every later key was added with a default.
FORMAT_1 = {
    "format_version": 1,
    "actcache_version": "0.1.0",
    "model": {"name": "m", "weights_hash": "h", "model_type": "bert", "num_hidden_layers": 2,
              "hidden_size": 32, "tokenizer": "BertTokenizerFast", "padding_side": "right"},
    "layers": [0, 1, 2],
    "poolings": ["mean"],
    "dtype": "float16",
    "model_dtype": "float32",
    "max_length": 16,
    "truncation_side": "right",
    "text_column": "text",
    "id_column": None,
    "rows_per_unit": 8,
    "chunk_rows": 8,
    "codec": "blosc-zstd-3-shuffle",
    "n_units": 2,
    "truncated": 0,
    # A job of that time: no store_inputs, last_layer or media columns yet.
    "job": {"model": "m", "inputs": "in.jsonl", "store": "s.zarr", "layers": "all",
            "pooling": ["mean"], "dtype": "float16", "model_dtype": "float32"},
}


def test_a_format_1_manifest_takes_the_defaults_of_what_came_later():
    m = Manifest.model_validate(FORMAT_1)
    assert m.format_version == 1
    assert m.checksum is None  # format 1 had no checksums: absent means none
    assert (m.modality, m.prefix_tokens, m.final_norm, m.side, m.self_check) == (
        "text", 0, False, None, None)
    assert m.store_inputs is True
    job = m.job_config
    assert (job.store_inputs, job.last_layer, job.batch_size) == (True, "hidden_states", 32)


def test_a_format_2_manifest_keeps_its_checksum_and_a_new_one_has_it_by_default():
    assert Manifest.model_validate({**FORMAT_1, "format_version": 2,
                                    "checksum": "crc32c"}).checksum == "crc32c"
    fresh = {k: v for k, v in FORMAT_1.items() if k != "format_version"}
    m = Manifest.model_validate(fresh)
    assert (m.format_version, m.checksum) == (FORMAT_VERSION, "crc32c")


def test_a_job_field_this_version_no_longer_knows_is_left_out():
    job = Manifest.model_validate({**FORMAT_1, "job": {**FORMAT_1["job"], "retired": 1}})
    assert job.job_config.model == "m"


@pytest.mark.parametrize("store_inputs", [True, False])
def test_store_inputs_is_the_jobs_own(store_inputs):
    m = Manifest.model_validate({**FORMAT_1, "job": {**FORMAT_1["job"],
                                                     "store_inputs": store_inputs}})
    assert m.store_inputs is store_inputs


def test_a_worker_spec_round_trips_as_a_dict():
    """What crosses to a worker (a dict over the wire, or the model itself) is the same spec."""
    spec = WorkerSpec(manifest=Manifest.model_validate(FORMAT_1),
                      check_inputs=("a", ("b", "c")))
    again = WorkerSpec.model_validate(spec.model_dump(mode="json"))
    assert again == spec
    assert isinstance(again.manifest.job_config, JobConfig)
