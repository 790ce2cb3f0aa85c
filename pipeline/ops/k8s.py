"""Kubernetes manifests for scheduled runs: a CronJob that creates a KubeRay RayJob.

KubeRay's RayJob (``ray.io/v1``) has no schedule of its own (RayCronJob arrived only
in KubeRay 1.6, as alpha), so the standard pattern is used: a ``batch/v1`` CronJob
whose pod runs ``kubectl create -f rayjob.yaml``. Each run gets a fresh RayJob (its
``metadata.generateName``), which brings up a Ray cluster from the actcache image, runs
``python -m actcache.cli cache`` on the job config mounted from a ConfigMap, and is torn
down when the job ends. The RayJob manifest lives in the same ConfigMap, so
``kubectl apply -f`` of the rendered file is all it takes; a ServiceAccount with a Role
allowing ``create`` on ``rayjobs`` lets the CronJob's pod do it.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from actcache import __version__

RAY_VERSION = "2.60.0"
"""Ray in the worker image (docker/Dockerfile's base tag); within pyproject's ray range."""
PYTHON_TAG = "py311"
RAY_BASE_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-cpu"
"""Base of docker/Dockerfile (the -gpu variant for CUDA nodes)."""
IMAGE = f"actcache:{__version__}"
"""The worker image docker/compose.yaml builds; push it to a registry for Kubernetes."""
KUBECTL_IMAGE = "bitnami/kubectl:1.31"
CONFIG_DIR = "/home/ray/actcache"
"""Where the job config ConfigMap is mounted in the Ray head pod."""
JOB_FILE = "job.yaml"
RAYJOB_FILE = "rayjob.yaml"
S3_SECRET = "actcache-s3"
"""Optional Secret whose keys (AWS_ACCESS_KEY_ID, ...) become the pods' environment."""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded job and RayJob) as readable ``|`` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False)


def entrypoint() -> str:
    return f"python -m actcache.cli cache {CONFIG_DIR}/{JOB_FILE}"


def k8s_name(text: str, limit: int = 30) -> str:
    """A DNS-1123 label from ``text`` (lowercase letters, digits and dashes)."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return name or "job"


def _ray_container(name: str, image: str, gpus: float | None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "envFrom": [{"secretRef": {"name": S3_SECRET, "optional": True}}],
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"},
                      "limits": {"cpu": "2", "memory": "8Gi"}},
    }
    if gpus:
        whole = max(1, int(gpus + 0.999))
        container["resources"]["limits"]["nvidia.com/gpu"] = whole
    return container


def rayjob(
    name: str, image: str, config_map: str, workers: int, gpus_per_worker: float | None
) -> dict[str, Any]:
    """The RayJob each scheduled run creates."""
    head = _ray_container("ray-head", image, None)
    head["ports"] = [{"containerPort": 6379, "name": "gcs"},
                     {"containerPort": 8265, "name": "dashboard"}]
    head["volumeMounts"] = [{"name": "job-config", "mountPath": CONFIG_DIR}]
    worker = _ray_container("ray-worker", image, gpus_per_worker)
    spec: dict[str, Any] = {
        "entrypoint": entrypoint(),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,
        "rayClusterSpec": {
            "rayVersion": RAY_VERSION,
            "headGroupSpec": {
                "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                "template": {"spec": {
                    "containers": [head],
                    "volumes": [{"name": "job-config", "configMap": {"name": config_map}}],
                }},
            },
            "workerGroupSpecs": [{
                "groupName": "gpu" if gpus_per_worker else "cpu",
                "replicas": workers, "minReplicas": workers, "maxReplicas": workers,
                "rayStartParams": {},
                "template": {"spec": {"containers": [worker]}},
            }],
        },
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"generateName": f"{name}-", "labels": {"app.kubernetes.io/name": "actcache",
                                                             "actcache/job": name}},
        "spec": spec,
    }


def render(
    job_name: str,
    job: dict[str, Any],
    cron: str,
    *,
    image: str = IMAGE,
    workers: int = 1,
    gpus_per_worker: float | None = None,
    namespace: str | None = None,
) -> str:
    """Multi-document YAML: ConfigMap (job + RayJob), RBAC, and the CronJob."""
    name = f"actcache-{k8s_name(job_name)}"
    meta = {"namespace": namespace} if namespace else {}
    labels = {"app.kubernetes.io/name": "actcache", "actcache/job": name}
    config_map = f"{name}-config"
    account = f"{name}-scheduler"
    manifest = rayjob(name, image, config_map, workers, gpus_per_worker)
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": config_map, "labels": labels, **meta},
         "data": {JOB_FILE: dump(job), RAYJOB_FILE: dump(manifest)}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": account, "labels": labels, **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": account, "labels": labels, **meta},
         "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                    "verbs": ["create", "get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": account, "labels": labels, **meta},
         "subjects": [{"kind": "ServiceAccount", "name": account, **meta}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account}},
        _cronjob(name, cron, account, config_map, labels, meta),
    ]
    return "---\n".join(dump(d) for d in docs)


def _cronjob(
    name: str, cron: str, account: str, config_map: str, labels: dict[str, str],
    meta: dict[str, str],
) -> dict[str, Any]:
    # Forbid: a nightly run still going when the next is due is left alone (the store's
    # lease would refuse the second one anyway).
    return {
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": name, "labels": labels, **meta},
        "spec": {
            "schedule": cron,
            "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"spec": {"backoffLimit": 1, "template": {"spec": {
                "serviceAccountName": account,
                "restartPolicy": "Never",
                "containers": [{
                    "name": "create-rayjob",
                    "image": KUBECTL_IMAGE,
                    "command": ["kubectl", "create", "-f", f"/rayjob/{RAYJOB_FILE}"],
                    "volumeMounts": [{"name": "rayjob", "mountPath": "/rayjob"}],
                }],
                "volumes": [{"name": "rayjob", "configMap": {
                    "name": config_map, "items": [{"key": RAYJOB_FILE, "path": RAYJOB_FILE}]}}],
            }}}},
        },
    }
