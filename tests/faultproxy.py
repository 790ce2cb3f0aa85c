"""A fault-injecting HTTP proxy for an S3 endpoint, on loopback, seeded.

Each request is forwarded to the upstream endpoint, or, at ``rate``, meets one fault
drawn from a seeded generator: a connection reset before any response, HTTP 500
InternalError, HTTP 503 SlowDown, a response delayed past the client's read timeout,
(after the upstream handled it), or a body cut short (the full Content-Length announced, half the bytes sent, then the
connection dropped). ``deny`` answers every request with 403 AccessDenied instead.
``counts`` tells how many of each fault were injected.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

FAULTS = ("reset", "error_500", "slowdown_503", "slow", "truncated")
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def _error(status: int, code: str, message: str) -> web.Response:
    body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>{message}</Message><RequestId>fault</RequestId></Error>")
    return web.Response(status=status, body=body.encode(), content_type="application/xml")


class FaultProxy:
    def __init__(self, upstream: str, rate: float, seed: int = 0, slow_s: float = 3.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.rate = rate
        self.slow_s = slow_s
        self.deny = False
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self.url = ""

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._session = self._loop.run_until_complete(self._make_session())
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._session.close())
            self._loop.run_until_complete(runner.cleanup())

    @staticmethod
    async def _make_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(auto_decompress=False)

    def _pick(self) -> str | None:
        if self.deny:
            return "deny"
        if self._rng.random() >= self.rate:
            return None
        return self._rng.choice(FAULTS)

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, Any, bytes]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as resp:
            return resp.status, resp.headers, await resp.read()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = self._pick()
        if fault:
            self.counts[fault] += 1
        if fault == "deny":
            return _error(403, "AccessDenied", "Access Denied")
        if fault == "reset":
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        if fault == "error_500":
            return _error(500, "InternalError", "We encountered an internal error.")
        if fault == "slowdown_503":
            return _error(503, "SlowDown", "Please reduce your request rate.")
        status, headers, data = await self._forward(request, body)
        if fault == "slow":
            # The store did the work; its answer comes after the client gave up waiting.
            await asyncio.sleep(self.slow_s)
        response = web.StreamResponse(status=status)
        for key, value in headers.items():
            if key.lower() not in HOP_HEADERS:
                response.headers[key] = value
        response.content_length = len(data)
        await response.prepare(request)
        if fault == "truncated" and len(data) > 1:
            await response.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        await response.write(data)
        await response.write_eof()
        return response
