"""The replicas behind the router: their routing state (pool, probes) and their processes.

Routing state (`ReplicaPool`) is what create_router_app decides with; see router.py for the rules. The process side
(`run_replicas`, behind `serve_replicas` and `gptforge serve --replicas N`):

- Each replica is `worker_argv(port)` on a free loopback port, in a session of its own (so a terminal's Ctrl-C
  reaches only the router, which then drains before it stops the replicas) and with a random internal API key in
  $GPTFORGE_API_KEY that only the router knows: the replica ports are reachable by every local user, and the key
  keeps them from being a way around the router's own keys.
- Start-up waits until every replica answers /health/ready; one that exits first fails the start with its status
  and the tail of its output (which is otherwise forwarded to stderr, prefixed by the replica's index).
- A supervisor thread respawns a replica that exits (on a new port; the pool admits it on its first good probe),
  with an exponential back-off when a replica dies young, so a crash loop costs little.
- SIGINT/SIGTERM: stop accepting, let in-flight requests finish (drain_timeout_s), stop the replicas (SIGTERM,
  then SIGKILL), return. If the router dies without that (SIGKILL, a crash), a watchdog process kills the
  replicas: it reads the replica pids from a pipe, and end-of-file on that pipe means the router is gone, however it
  died. This needs neither prctl (Linux only) nor polling a parent pid that the OS may reuse.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn

if TYPE_CHECKING:
    from gptforge.serve.router import RouterSettings

log = logging.getLogger("gptforge.serve.router")


@dataclass(frozen=True)
class Lease:
    """One attempt's hold on a replica; `generation` tells a report about a replaced process from a current one."""

    index: int
    url: str
    generation: int


@dataclass
class Replica:
    """One replica slot. The counters cover every process that held the slot, so they only ever grow (Prometheus
    counters are read from them at scrape time)."""

    index: int
    url: str
    generation: int = 0
    pid: int | None = None
    healthy: bool = False
    probed: bool = False  # False until the first probe of this process: its first good probe admits it at once
    in_flight: int = 0
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    responses: dict[str, int] = field(default_factory=dict)  # by HTTP status ("mid_stream_error" for a cut stream)
    failures: dict[str, int] = field(default_factory=dict)  # by kind: connection, http_5xx, timeout, mid_stream, probe
    ejections: int = 0
    restarts: int = 0
    last_error: str | None = None


class ReplicaPool:
    """Routing state of the replicas. Thread-safe: the process supervisor swaps replicas from its own thread."""

    def __init__(self, upstreams: list[str], settings: RouterSettings) -> None:
        if not upstreams:
            raise ValueError("the router needs at least one upstream URL, got none")
        self.settings = settings
        self.replicas = [Replica(i, u.rstrip("/")) for i, u in enumerate(upstreams)]
        self._lock = threading.Lock()
        self._next = 0  # round-robin cursor among equally loaded replicas

    def acquire(self, exclude: set[int] = frozenset()) -> Lease | None:
        """The least-loaded healthy replica not in `exclude` (its in-flight count taken), or None."""
        with self._lock:
            n, best = len(self.replicas), None
            for k in range(n):
                r = self.replicas[(self._next + k) % n]
                if r.healthy and r.index not in exclude and (best is None or r.in_flight < best.in_flight):
                    best = r
            if best is None:
                return None
            self._next = (best.index + 1) % n
            best.in_flight += 1
            return Lease(best.index, best.url, best.generation)

    def release(self, lease: Lease) -> None:
        with self._lock:
            self.replicas[lease.index].in_flight -= 1

    def count_response(self, index: int, status: int | str) -> None:
        with self._lock:
            responses = self.replicas[index].responses
            responses[str(status)] = responses.get(str(status), 0) + 1

    def report_success(self, lease: Lease, status: int) -> None:
        self.count_response(lease.index, status)
        with self._lock:
            r = self.replicas[lease.index]
            if r.generation == lease.generation:
                r.consecutive_failures = 0

    def report_failure(self, lease: Lease, kind: str, error: str, eject: bool) -> None:
        """A failed attempt: `eject` takes the replica out at once (connection errors); otherwise it counts."""
        with self._lock:
            r = self.replicas[lease.index]
            r.failures[kind] = r.failures.get(kind, 0) + 1
            if r.generation != lease.generation:
                return  # about a process that has been replaced since
            r.last_error = error
            r.consecutive_successes = 0
            r.consecutive_failures += 1
            if eject or r.consecutive_failures >= self.settings.eject_after_failures:
                self._eject(r, error)

    def record_probe(self, index: int, generation: int, ok: bool, error: str | None = None) -> None:
        with self._lock:
            r = self.replicas[index]
            if r.generation != generation:
                return
            first, r.probed = not r.probed, True
            if ok:
                r.consecutive_failures = 0
                r.consecutive_successes += 1
                if not r.healthy and (first or r.consecutive_successes >= self.settings.readmit_after_successes):
                    r.healthy = True
                    (log.info if first else log.warning)("replica %d (%s) is in rotation", r.index, r.url)
                return
            r.failures["probe"] = r.failures.get("probe", 0) + 1
            r.last_error = error
            r.consecutive_successes = 0
            r.consecutive_failures += 1
            if r.consecutive_failures >= self.settings.eject_after_failures:
                self._eject(r, error or "probe failed")

    def mark_down(self, index: int, reason: str) -> None:
        """The replica's process is gone: out of rotation now, whatever the probes last said."""
        with self._lock:
            r = self.replicas[index]
            r.last_error = reason
            self._eject(r, reason)

    def replace(self, index: int, url: str, pid: int | None = None) -> None:
        """A new process serves slot `index` at `url`; it joins rotation on its first good probe."""
        with self._lock:
            r = self.replicas[index]
            self._eject(r, "replaced")
            r.url, r.pid, r.generation = url.rstrip("/"), pid, r.generation + 1
            r.probed, r.consecutive_failures, r.consecutive_successes = False, 0, 0
            r.restarts += 1

    def set_pid(self, index: int, pid: int) -> None:
        with self._lock:
            self.replicas[index].pid = pid

    def _eject(self, r: Replica, reason: str) -> None:
        # Callers hold the lock. Ejecting an ejected replica changes nothing and counts nothing.
        if r.healthy:
            r.healthy = False
            r.ejections += 1
            log.warning("replica %d (%s) ejected: %s", r.index, r.url, reason)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(r) for r in self.replicas]

    @property
    def num_healthy(self) -> int:
        with self._lock:
            return sum(r.healthy for r in self.replicas)

    async def probe_all(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        with self._lock:
            targets = [(r.index, r.url, r.generation) for r in self.replicas]
        await asyncio.gather(*(self._probe(client, headers, *t) for t in targets))

    async def _probe(self, client: httpx.AsyncClient, headers: dict[str, str], index: int, url: str, gen: int) -> None:
        try:
            resp = await client.get(f"{url}/health/ready", headers=headers)
            ok, error = resp.status_code == 200, f"probe: HTTP {resp.status_code}"
        except httpx.HTTPError as e:
            ok, error = False, f"probe: {type(e).__name__}: {e}"
        self.record_probe(index, gen, ok, None if ok else error)


_TAIL_LINES = 40  # output lines kept per replica for start-up error messages
_STOP_GRACE_S = 5.0  # after SIGTERM, seconds a replica (or, in the watchdog, an orphan) gets before SIGKILL


class ReplicaStartError(ValueError):
    """A replica exited or did not become ready during start-up. A ValueError because the usual cause is the user's
    (a bad checkpoint, a bad flag), so the CLI prints the message, which carries the replica's last output."""


class _Shutdown(BaseException):
    """SIGINT/SIGTERM outside uvicorn's own handling (during start-up, or re-raised by uvicorn after its drain)."""


def free_port() -> int:
    """A loopback port that was free a moment ago (a replica that loses the race fails and is respawned)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(pid: int, sig: int) -> None:
    """Signal a replica and anything it started (its process group, as it leads its own session)."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(pid, sig)
        else:  # Windows: no process groups to signal; terminate the process itself
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class WorkerProcess:
    """One replica slot: the current process, its port, and the tail of its output."""

    def __init__(self, index: int, argv_for_port: Callable[[int], list[str]], env: dict[str, str]) -> None:
        self.index, self._argv_for_port, self._env = index, argv_for_port, env
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.argv: list[str] = []
        self.started_at = 0.0
        self.backoff_s = 0.0  # delay before the next respawn; grows while the replica keeps dying young
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def spawn(self) -> None:
        self.port = free_port()
        self.argv = [str(a) for a in self._argv_for_port(self.port)]
        self.tail.clear()
        if os.name == "posix":
            isolate: dict[str, Any] = {"start_new_session": True}
        else:
            isolate = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        pipe, devnull, stdout = subprocess.PIPE, subprocess.DEVNULL, subprocess.STDOUT
        self.proc = subprocess.Popen(self.argv, env=self._env, stdin=devnull, stdout=pipe, stderr=stdout, **isolate)
        self.started_at = time.monotonic()
        self._reader = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _pump(self, stream) -> None:
        # A pipe, not a file: the replica's output still reaches the terminal, and the tail is at hand for errors.
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            self.tail.append(line)
            print(f"[replica {self.index}] {line}", file=sys.stderr, flush=True)
        stream.close()

    def output_tail(self) -> str:
        if self._reader is not None:
            self._reader.join(timeout=1.0)  # the process has exited: let the reader take the last lines
        return "\n".join(f"  | {line}" for line in self.tail) or "  | (no output)"


class Watchdog:
    """A sidecar process that kills the replicas when this process ends without stopping them itself."""

    def __init__(self) -> None:
        isolate = {"start_new_session": True} if os.name == "posix" else {}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptforge.serve.replicas", "--watchdog"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            **isolate,
        )
        self._lock = threading.Lock()

    def track(self, pid: int) -> None:
        self._send(f"+{pid}")

    def forget(self, pid: int) -> None:
        self._send(f"-{pid}")

    def _send(self, line: str) -> None:
        with self._lock:
            try:
                self.proc.stdin.write(line + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                log.warning("the replica watchdog is gone; replicas may outlive a crash of the router")

    def close(self) -> None:
        with self._lock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=_STOP_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _watchdog_main() -> None:
    """`python -m gptforge.serve.replicas --watchdog`: '+pid'/'-pid' lines on stdin; at end-of-file, kill the rest."""
    for name in ("SIGINT", "SIGHUP"):  # only end-of-file may end it: the terminal's signals are the router's
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    pids: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line[:1] in "+-" and line[1:].isdigit():
            (pids.add if line[0] == "+" else pids.discard)(int(line[1:]))
    if not pids:
        return
    for pid in pids:
        _kill_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    while time.monotonic() < deadline and any(_exists(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        _kill_group(pid, getattr(signal, "SIGKILL", signal.SIGTERM))


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_ready(workers: list[WorkerProcess], headers: dict[str, str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = {w.index: w for w in workers}
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while pending:
            for i, w in list(pending.items()):
                rc = w.proc.poll()
                if rc is not None:
                    raise ReplicaStartError(
                        f"replica {i} exited with status {rc} during start-up; command: {shlex.join(w.argv)}\n"
                        f"its last output:\n{w.output_tail()}"
                    )
                try:
                    if client.get(f"{w.url}/health/ready", headers=headers).status_code == 200:
                        del pending[i]
                except httpx.HTTPError:
                    pass  # not listening yet
            if pending and time.monotonic() > deadline:
                w = next(iter(pending.values()))
                raise ReplicaStartError(
                    f"replica(s) {sorted(pending)} not ready after {timeout_s:g}s (raise ready_timeout_s if the model "
                    f"is slow to load); replica {w.index}'s last output:\n{w.output_tail()}"
                )
            if pending:
                time.sleep(0.1)


def _supervise(workers: list[WorkerProcess], pool: ReplicaPool, watchdog: Watchdog, respawn: bool, stop) -> None:
    """Thread: notice replicas that exit, take them out of rotation, respawn them (with back-off)."""
    exited_at: dict[int, float] = {}
    while not stop.wait(0.2):
        now = time.monotonic()
        for w in workers:
            rc = w.proc.poll()
            if rc is None:
                continue
            if w.index not in exited_at:
                exited_at[w.index] = now
                lived = now - w.started_at
                w.backoff_s = 0.0 if lived > 30 else min(max(0.5, 2 * w.backoff_s), 30.0)
                _kill_group(w.pid, getattr(signal, "SIGKILL", signal.SIGTERM))  # whatever it left behind
                watchdog.forget(w.pid)
                pool.mark_down(w.index, f"process {w.pid} exited with status {rc}")
                verb = f"respawning in {w.backoff_s:g}s" if respawn else "not respawning (respawn=False)"
                log.warning("replica %d (pid %d) exited (status %s) after %.1fs; %s", w.index, w.pid, rc, lived, verb)
            if respawn and now >= exited_at[w.index] + w.backoff_s and not stop.is_set():
                try:
                    w.spawn()
                except OSError as e:
                    log.warning("replica %d could not be started: %s", w.index, e)
                    exited_at[w.index] = now
                    continue
                del exited_at[w.index]
                watchdog.track(w.pid)
                pool.replace(w.index, w.url, w.pid)
                log.info("replica %d respawned as pid %d on %s", w.index, w.pid, w.url)


def _stop_workers(workers: list[WorkerProcess], grace_s: float, watchdog: Watchdog | None, hurry) -> None:
    running = [w for w in workers if w.proc is not None]
    for w in running:
        _kill_group(w.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for w in running:
        while w.proc.poll() is None and time.monotonic() < deadline and not hurry.is_set():
            time.sleep(0.05)
        if w.proc.poll() is None:
            _kill_group(w.pid, getattr(signal, "SIGKILL", signal.SIGTERM))
            w.proc.wait()
        if watchdog is not None:
            watchdog.forget(w.pid)


class _RouterServer(uvicorn.Server):
    """uvicorn's server, telling the app and the supervisor as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def _listen(host: str, port: int) -> socket.socket:
    """Bind the public port before any replica starts: a taken port fails at once, not after model loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run_replicas(
    worker_argv: Callable[[int], list[str]], replicas: int, host: str, port: int, settings: RouterSettings
) -> None:
    """The body of router.serve_replicas (see the module docstring). Returns after SIGINT/SIGTERM and cleanup."""
    import secrets

    from gptforge.serve.auth import ENV_VAR
    from gptforge.serve.router import create_router_app

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    logger = logging.getLogger("gptforge.serve")
    if not logger.handlers:  # a CLI run: say what the router does, like uvicorn says what it serves
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("router: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    sock = _listen(host, port)
    key = secrets.token_urlsafe(32)
    internal = {"Authorization": f"Bearer {key}"}
    workers = [WorkerProcess(i, worker_argv, {**os.environ, ENV_VAR: key}) for i in range(replicas)]
    stop, hurry = threading.Event(), threading.Event()
    watchdog: Watchdog | None = None
    supervisor: threading.Thread | None = None
    main_thread = threading.current_thread() is threading.main_thread()
    handled = [s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None]
    previous = {s: signal.getsignal(s) for s in handled} if main_thread else {}

    def shutdown(signum, frame) -> None:
        raise _Shutdown(signum)

    for s in previous:
        signal.signal(s, shutdown)
    try:
        watchdog = Watchdog()
        for w in workers:
            w.spawn()
            watchdog.track(w.pid)
        _wait_ready(workers, internal, settings.ready_timeout_s)
        app = create_router_app([w.url for w in workers], settings, internal)
        pool: ReplicaPool = app.state.pool
        for w in workers:
            pool.set_pid(w.index, w.pid)

        def on_exit() -> None:
            app.state.draining = True
            stop.set()

        supervisor = threading.Thread(target=_supervise, args=(workers, pool, watchdog, settings.respawn, stop))
        supervisor.daemon = True
        supervisor.start()
        config = uvicorn.Config(app, timeout_graceful_shutdown=settings.drain_timeout_s, log_level="info")
        log.info("routing http://%s:%d to %d replicas: %s", host, port, replicas, [w.url for w in workers])
        _RouterServer(config, on_exit).run(sockets=[sock])
    except _Shutdown:
        pass  # asked to stop: a normal end
    finally:
        for s in previous:  # a second signal now cuts the replicas' grace short instead of the cleanup itself
            signal.signal(s, lambda signum, frame: hurry.set())
        stop.set()
        if supervisor is not None:
            supervisor.join()
        _stop_workers(workers, settings.drain_timeout_s + _STOP_GRACE_S, watchdog, hurry)
        if watchdog is not None:
            watchdog.close()
        sock.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    if sys.argv[1:] == ["--watchdog"]:
        _watchdog_main()
