"""What a user sees when a run fails: a user error is one `error:` line and exit 2, a fault
of the system exit 1 with its traceback in a log, a Ctrl-C exit 130.

The runs here are dry runs: they load the model and decode the inputs in this process
(the workers' self-check), so a failure can be injected without Ray.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from actcache.cli import main
from actcache.schemas.errors import (
    ActcacheError,
    InputDataError,
    LeaseLostError,
    MediaFileError,
    ModelLoadError,
    RunInterrupted,
    UserError,
)
from actcache.workers.model import model_folder
from tests.conftest import SENTENCES
from tests.media import write_images


def dry_run(folder: Path, job: dict, capsys) -> tuple[int, list[str]]:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    code = main(["cache", str(path), "--dry-run"])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.fixture
def text_job(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.setenv("ACTCACHE_LOG_DIR", str(tmp_path / "logs"))
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES[:4]))
    return {"model": tiny_bert, "inputs": str(inputs), "store": str(tmp_path / "s.zarr"),
            "layers": [0, 1], "pooling": ["mean"], "rows_per_unit": 4}


def test_a_bug_while_loading_the_model_is_a_fault_with_a_log(tmp_path, text_job, capsys,
                                                            monkeypatch):
    import torch
    from transformers import AutoModel

    def out_of_memory(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(AutoModel, "from_pretrained", out_of_memory)
    code, err = dry_run(tmp_path, text_job, capsys)
    assert code == 1
    assert len(err) == 1, err
    assert err[0].startswith("error: internal error (OutOfMemoryError: CUDA out of memory. "
                             "Tried to allocate 2.00 GiB); traceback in ")
    log = Path(err[0].rsplit("traceback in ", 1)[1])
    assert log.parent == tmp_path / "logs"
    assert "Traceback" in log.read_text() and "out_of_memory" in log.read_text()


def test_a_runtime_error_while_loading_the_config_is_a_fault_too(tmp_path, text_job, capsys,
                                                                 monkeypatch):
    from transformers import AutoConfig

    def bug(*_args, **_kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(AutoConfig, "from_pretrained", bug)
    code, err = dry_run(tmp_path, text_job, capsys)
    assert code == 1
    assert err[0].startswith("error: internal error (RuntimeError: something inside broke); ")
    assert list((tmp_path / "logs").iterdir())


def _copy_model(tiny_bert: str, folder: Path) -> Path:
    return Path(shutil.copytree(tiny_bert, folder))


def _garble_config(model: Path) -> None:
    (model / "config.json").write_text("{not json")


def _truncate_weights(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _remove_weights(model: Path) -> None:
    (model / "model.safetensors").unlink()


def _unknown_type(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "no-such-type"}))


BROKEN = [
    ("config-not-json", _garble_config, "is not a valid JSON file"),
    ("unknown-model-type", _unknown_type, "no-such-type"),
    ("weights-truncated", _truncate_weights, "Error while deserializing header"),
    ("weights-missing", _remove_weights, "model.safetensors"),
]


@pytest.mark.parametrize(("case", "damage", "says"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_model_folder_is_a_user_error(tmp_path, text_job, tiny_bert, capsys, case,
                                               damage, says):
    model = _copy_model(tiny_bert, tmp_path / "model")
    damage(model)
    code, err = dry_run(tmp_path, {**text_job, "model": str(model)}, capsys)
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert says in err[0] and str(model) in err[0], err[0]
    assert not (tmp_path / "logs").exists()


def test_a_model_missing_from_the_cache_is_named_with_the_download_command(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match=r"model 'nobody/never-cached' is not in the local "
                       r"Hugging Face cache .* `hf download nobody/never-cached`"):
        model_folder("nobody/never-cached")
    with pytest.raises(ModelLoadError, match="neither a local folder nor a hub id"):
        model_folder("not a hub id!")


def test_a_broken_cache_is_not_reported_as_a_missing_model(monkeypatch):
    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", "/cache/models--org--name")

    monkeypatch.setattr("huggingface_hub.snapshot_download", denied)
    with pytest.raises(PermissionError):
        model_folder("org/name")


def test_an_image_that_changed_after_the_check_names_the_file_and_the_fix(
        tmp_path, media_models, capsys, monkeypatch):
    monkeypatch.setenv("ACTCACHE_LOG_DIR", str(tmp_path / "logs"))
    good = write_images(tmp_path / "images")[0]
    torn = [tmp_path / f"torn{i}.png" for i in range(2)]
    for path in torn:
        path.write_bytes(good.read_bytes()[:200])
    inputs = tmp_path / "in.jsonl"
    # Two rows: the self-check (a padded batch against each input alone) reads both.
    inputs.write_text("".join(json.dumps({"image": str(p)}) + "\n" for p in torn))
    # The driver decodes every file before the run; this one breaks after that check.
    monkeypatch.setattr("actcache.workers.media.check_decodes", lambda *_: None)
    job = {"model": media_models("vit"), "inputs": str(inputs), "store": str(tmp_path / "s.zarr"),
           "image_column": "image", "layers": [0], "pooling": ["mean"], "rows_per_unit": 2}
    code, err = dry_run(tmp_path, job, capsys)
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith((f"error: cannot read image '{torn[0]}': ",
                              f"error: cannot read image '{torn[1]}': "))
    assert err[0].endswith("; the file changed after the run checked it: restore or fix it, "
                           "or remove its row, and rerun")
    assert not (tmp_path / "logs").exists()


def test_media_errors_are_input_errors_and_value_errors():
    error = MediaFileError("cannot read audio 'a.wav'")
    assert isinstance(error, InputDataError) and isinstance(error, ValueError)


@pytest.mark.parametrize("cls", [LeaseLostError, MediaFileError, ModelLoadError])
def test_every_deliberate_error_is_in_the_hierarchy(cls):
    assert issubclass(cls, UserError) and issubclass(cls, ActcacheError)


def test_except_exception_does_not_swallow_a_ctrl_c():
    swallowed = []

    def run() -> None:
        raise RunInterrupted("interrupted; 8 rows committed, rerun to finish")

    def cleanup_that_catches_everything() -> None:
        try:
            run()
        except Exception as e:
            swallowed.append(e)

    with pytest.raises(KeyboardInterrupt, match="8 rows committed"):
        cleanup_that_catches_everything()
    assert swallowed == []


def test_an_interrupted_run_exits_130_with_what_was_committed(tmp_path, text_job, capsys,
                                                              monkeypatch):
    import actcache.cache.driver

    def interrupted(*_args, **_kwargs):
        raise RunInterrupted("interrupted; 8 rows committed, rerun to finish")

    monkeypatch.setattr(actcache.cache.driver, "run_job", interrupted)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(text_job))
    assert main(["cache", str(path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; 8 rows committed, rerun to finish"
    assert not (tmp_path / "logs").exists()


def test_a_lost_lease_is_one_line_naming_what_to_do(tmp_path, text_job, capsys, monkeypatch):
    import actcache.cache.driver
    from actcache.cache.lease import Lease

    lease = Lease(str(tmp_path / "s.zarr"), "r1")
    lease.lost = True  # what the heartbeat sets when another run took the lease over

    def stalled(*_args, **_kwargs):
        lease.check()

    monkeypatch.setattr(actcache.cache.driver, "run_job", stalled)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(text_job))
    assert main(["cache", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: run r1 lost the write lease of {tmp_path / 's.zarr'} to another run (its "
        "heartbeat went stale: the machine or the storage stalled); it stopped, and the units "
        "it committed are kept: rerun the job once the other run has finished")
