"""The HTTP lifecycle every fastserve server shares: bind a socket, run uvicorn on it in the foreground (`run`: until
SIGINT / SIGTERM, then exit cleanly) or on a background thread (`start` / `stop`), and answer requests in flight
on shutdown. A subclass supplies `app` (the ASGI app), `cfg` (host, port), `shutdown_grace_s`, and what runs
behind the app: `_begin` / `_end` (start / stop the engine or worker), `_banner`, `_cancel_in_flight`.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading
import time
from typing import Any


class HTTPService:
    """uvicorn around `self.app`; see the module docstring for what a subclass provides."""

    url: str | None = None
    shutdown_grace_s: float = 5.0
    _uvicorn: Any = None
    _thread: threading.Thread | None = None

    def _begin(self) -> None: ...

    def _end(self) -> None: ...

    def _banner(self) -> str:
        return f"fastserve: serving at {self.url}; Ctrl-C stops"

    def _cancel_in_flight(self) -> None:
        """The shutdown grace period is over: stop whatever is still running so that its handler can answer."""

    def _bind(self, host: str | None, port: int | None) -> socket.socket:
        host = self.cfg.host if host is None else host
        port = self.cfg.port if port is None else port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot listen on {host}:{port} ({e.strerror}); set serve.port (0: any free port)") from e
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        self.url = f"http://[{shown}]:{sock.getsockname()[1]}" if ":" in shown else \
            f"http://{shown}:{sock.getsockname()[1]}"
        return sock

    def _make_uvicorn(self) -> Any:
        import uvicorn

        outer = self

        class _Uvicorn(uvicorn.Server):
            async def shutdown(self, sockets: Any = None) -> None:
                """As uvicorn's (which waits timeout_graceful_shutdown for open requests, then kills their tasks
                unanswered), cancelling the requests still generating after shutdown_grace_s so that they are
                answered before that."""
                timer = asyncio.get_running_loop().call_later(outer.shutdown_grace_s, outer._cancel_in_flight)
                try:
                    await super().shutdown(sockets)
                finally:
                    timer.cancel()

            @contextlib.contextmanager
            def capture_signals(self) -> Any:
                """As uvicorn's, less re-raising the signal once shut down: uvicorn does, which kills the process
                on SIGTERM (status 143) before `run` stops the engine; here `run` returns and the process exits 0."""
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in original.items():
                        signal.signal(sig, handler)

        config = uvicorn.Config(self.app, lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=self.shutdown_grace_s + 5)
        self._uvicorn = _Uvicorn(config)
        return self._uvicorn

    def start(self, host: str | None = None, port: int | None = None, timeout: float = 30.0) -> "HTTPService":
        """Starts the engine and serves on a background thread; returns once the port accepts connections."""
        sock = self._bind(host, port)
        self._begin()
        server = self._make_uvicorn()
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fastserve-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def run(self, host: str | None = None, port: int | None = None) -> None:
        """Serves in the foreground until SIGINT / SIGTERM (see the class: requests in flight are answered), then
        stops the engine and returns."""
        sock = self._bind(host, port)
        self._begin()
        print(self._banner(), file=sys.stderr, flush=True)
        try:
            self._make_uvicorn().run(sockets=[sock])
        except KeyboardInterrupt:   # a second Ctrl-C while shutting down
            pass
        finally:
            self._end()
            print("fastserve: stopped", file=sys.stderr, flush=True)

    def stop(self, engine: bool = True) -> None:
        """Stops the HTTP server (open requests get shutdown_grace_s, then are cancelled and answered) and, unless
        engine=False, the engine."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(self.shutdown_grace_s + 15)
            self._thread = None
        if engine:
            self._end()

    def __enter__(self) -> "HTTPService":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
