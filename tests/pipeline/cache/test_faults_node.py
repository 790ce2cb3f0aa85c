"""A lost node: a two-worker-node Ray cluster on this machine, one node removed mid-run."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from actcache import open_store
from actcache.cache.driver import run_job
from tests.pipeline.cache.test_ray_cache import TEXTS, assert_same_store, job

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def lose_a_node_while_caching(tmp_path: Path, tiny_bert: str, store: Path) -> list[str]:
    """Cache into ``store`` on a two-node cluster; once two units are in, crash a node that
    hosts an actor (no graceful exit). Returns the removed node's id."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    # The head runs no actors; node failure is noticed within a couple of seconds.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 3},
    })
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    removed: list[str] = []

    def remove_a_busy_node() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((store / "units").glob("0*"))) < 2:
            time.sleep(0.05)
        busy = {a["Address"]["NodeID"] for a in ray.state.actors().values()
                if a["State"] == "ALIVE" and "CachingWorker" in a["ActorClassName"]}
        node = next(n for n in nodes if n.node_id in busy)
        cluster.remove_node(node, allow_graceful=False)
        removed.append(node.node_id)

    killer = threading.Thread(target=remove_a_busy_node)
    try:
        killer.start()
        run_job(job(tmp_path, tiny_bert, str(store), workers=2, cpus_per_worker=1, rows_per_unit=4,
                    batch_size=2), echo=lambda *_: None)
        killer.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return removed


def test_a_node_lost_mid_run_has_its_units_redone_on_the_survivor(
    tmp_path: Path, tiny_bert: str, capfd: pytest.CaptureFixture[str]
) -> None:
    reference = str(tmp_path / "reference.zarr")
    run_job(job(tmp_path, tiny_bert, reference), inline=True, echo=lambda *_: None)

    # The node goes once two units are in; on a fast machine the survivor can finish every
    # unit before the loss is noticed, and then nothing was lost mid-run: try again (a
    # fresh cluster and store), at most three times.
    for attempt in range(3):
        store = tmp_path / f"lost-{attempt}.zarr"
        removed = lose_a_node_while_caching(tmp_path, tiny_bert, store)
        if open_store(str(store)).runs[-1]["units_redone"]:
            break

    assert removed, "no node was removed"
    got = open_store(str(store))
    assert got.complete
    assert got.ids == tuple(f"r{i:03d}" for i in range(len(TEXTS)))  # every row exactly once
    assert_same_store(got, open_store(reference))
    record = got.runs[-1]
    assert record["status"] == "succeeded" and record["units_redone"], record
    err = capfd.readouterr().err
    for unit in record["units_redone"]:
        assert "a worker was lost" in err and f"unit {unit} is redone on another" in err
    # Receipts came from both nodes' actors, and the redone units from a survivor.
    print(f"units redone after the node loss: {record['units_redone']}")
