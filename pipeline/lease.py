"""One writer at a time: a lease object in the store, with a heartbeat.

The lease is ``lease/zarr.json``: a valid zarr group node whose attributes name the
holder, so plain zarr still reads the store. It is created exclusively (``"xb"``; on
S3 a conditional put), refreshed every ``HEARTBEAT_S`` and stale after ``STALE_S``. A
lease whose holder is provably dead (same host, pid gone) is taken over at once, so a
rerun right after a crash just works.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import psutil

from actcache.schemas import store as layout
from actcache.schemas.errors import LeaseHeldError
from actcache.workers.storage import filesystem, is_local

HEARTBEAT_S = 10.0
STALE_S = 60.0


class Lease:
    def __init__(self, url: str, run_id: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.run_id = run_id
        self.fs, root = filesystem(url, storage_options)
        self.path = f"{root}/{layout.LEASE_KEY}"
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        attrs = {"actcache_lease": {**self.holder, "heartbeat": time.time()}}
        return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}).encode()

    def _create(self) -> bool:
        if is_local(self.url):
            self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(self._payload())
        except FileExistsError:
            return False
        return True

    def current(self) -> dict[str, Any] | None:
        try:
            raw = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # torn write: treat as stale
        return dict(raw.get("attributes", {}).get("actcache_lease", {}))

    def _holder_dead(self, holder: dict[str, Any]) -> bool:
        if not holder:
            return True
        if time.time() - float(holder.get("heartbeat", 0)) > STALE_S:
            return True
        same_host = holder.get("host") == socket.gethostname()
        return same_host and not psutil.pid_exists(int(holder.get("pid", -1)))

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            holder = self.current()
            if holder is None:
                continue  # released between our create and our read
            if not self._holder_dead(holder):
                age = time.time() - float(holder.get("heartbeat", 0))
                raise LeaseHeldError(
                    f"store {self.url} is being written by run {holder.get('run_id')} on "
                    f"{holder.get('host')} (pid {holder.get('pid')}, heartbeat {age:.0f}s ago); "
                    "wait for it to finish, or stop it and run again"
                )
            self.fs.rm_file(self.path)
        raise LeaseHeldError(f"could not take the write lease of {self.url}; try again")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                holder = self.current()
                if holder and holder.get("run_id") == self.run_id:
                    self.fs.pipe_file(self.path, self._payload())

        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self.current()
        if holder and holder.get("run_id") == self.run_id:
            self.fs.rm_file(self.path)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
