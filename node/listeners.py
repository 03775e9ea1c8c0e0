"""Extra listener processes: ``[node] listeners = N`` serves one port from N processes.

One Python process runs its associations' pynetdicom threads under one interpreter lock; on a small machine
the second core then idles while four scanners push. With ``listeners = N``, ``harmonode serve`` and
``harmonode listen`` (the *parent*) start N-1 more processes, ``harmonode listen --extra-listener-of PID``,
with the same config. The parent alone listens on the port: its door admits each connection, then the
``ConnectionDispatcher`` passes the connected socket to the process serving the fewest connections (the
parent included; ties go to an extra listener), over a Unix socket pair per extra listener
(``handlers.transport``, item 7). Each process then serves its connections to the end.

What only the parent does, and why:

- startup recovery, before any extra listener starts: recovery settles and removes what is in ``tmp/``,
  where every process keeps its own slots (random names, each process's pool in its own memory), so it must
  never run beside a process that is writing;
- accepting connections, the series watcher (it reads the shared index: instances any listener stored
  complete their series), the storage commitment reporter (it reads the shared transactions: a request
  received by an extra listener is reported on a new association, within a second), the jobs (work,
  dispatch) and the web console.

An extra listener only serves the associations it is handed: C-ECHO, C-STORE into the shared file store and
index (SQLite in WAL mode; every write is one ``BEGIN IMMEDIATE`` transaction, which waits up to
``busy_timeout`` for another process's), C-FIND, C-MOVE, C-GET, N-ACTION. The door's caps hold per process.

Supervision: an extra listener that exits is started again (logged, with a growing pause while it keeps
dying at once); until it says it is ready, the parent serves what would have gone to it. SIGTERM to the
parent stops them (SIGTERM each, then SIGKILL after a grace period) and then itself. An extra listener dies
with its parent (``PR_SET_PDEATHSIG``), so a parent killed outright never leaves one writing while the next
parent recovers.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from handlers import transport

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
RESTART_PAUSE_S = (0.5, 30.0)  # first pause before a restart, and the longest (doubling while it dies at once)
_STABLE_S = 10.0  # an extra listener that lived this long restarts without a pause
HANDOFF_FD_ENV = "HARMONODE_HANDOFF_FD"  # an extra listener's end of its Unix socket pair with the parent


class _Target:
    """One extra listener as the dispatcher sees it: its socket, whether it is ready, what it serves."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ready = False
        self.serving = 0


class ConnectionDispatcher:
    """Which process serves a new connection: the one serving the fewest, the parent included.

    Parameters
    ----------
    local_count
        Connections the parent has open now, the one being placed included (``Door.open_count``).
    """

    def __init__(self, local_count: Callable[[], int]) -> None:
        self.local_count = local_count
        self._lock = threading.Lock()
        self._targets: dict[int, _Target] = {}
        self.passed = 0

    def connect(self, slot: int) -> socket.socket:
        """A new Unix socket pair for extra listener ``slot``: keep one end here, return the child's end."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        mine.setblocking(False)  # the accept loop never waits on a listener that stopped reading
        with self._lock:
            old = self._targets.pop(slot, None)
            self._targets[slot] = _Target(mine)
        if old is not None:
            old.sock.close()
        return theirs

    def disconnect(self, slot: int) -> None:
        """Extra listener ``slot`` exited: nothing more goes to it."""
        with self._lock:
            target = self._targets.pop(slot, None)
        if target is not None:
            target.sock.close()

    def close(self) -> None:
        """Close every extra listener's socket (they stop taking connections)."""
        for slot in list(self._targets):
            self.disconnect(slot)

    def _refresh(self) -> None:
        """Read every extra listener's news (under the lock)."""
        for target in self._targets.values():
            self._read_news(target)

    def _read_news(self, target: _Target) -> None:
        """Take in what an extra listener said since the last look (ready; connections ended)."""
        while True:
            try:
                news = target.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                target.ready = False
                return
            if not news:  # it exited
                target.ready = False
                return
            target.ready = target.ready or transport.HANDOFF_READY in news
            target.serving = max(0, target.serving - news.count(transport.HANDOFF_ENDED))

    def serving(self) -> dict[int, int]:
        """Connections each ready extra listener serves now, by slot (0 for the first extra listener)."""
        with self._lock:
            self._refresh()
            return {slot: t.serving for slot, t in self._targets.items() if t.ready}

    def pass_connection(self, request: socket.socket) -> bool:
        """Pass ``request`` to the least busy ready extra listener unless the parent serves fewer; True if passed."""
        with self._lock:
            self._refresh()
            ready = [t for t in self._targets.values() if t.ready]
            if not ready:
                return False
            best = min(ready, key=lambda t: t.serving)
            if best.serving > self.local_count() - 1:  # the parent serves fewer (not counting this one)
                return False
            try:
                socket.send_fds(best.sock, [transport.HANDOFF_PASSED], [request.fileno()])
            except BlockingIOError:  # its socket is full: it is behind, not gone
                log.warning("an extra listener is not taking connections: served here")
                return False
            except OSError as exc:
                log.warning("an extra listener could not take a connection (%s): served here", exc)
                best.ready = False
                return False
            best.serving += 1
            self.passed += 1
            return True


def die_with_parent(parent_pid: int) -> None:
    """Make this process receive SIGKILL when its parent dies (Linux); exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's stop is then the only way they end
        log.warning("this system cannot tie an extra listener's life to its parent's")
    if os.getppid() != parent_pid:
        raise SystemExit(f"extra listener: parent {parent_pid} is gone")


def stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt in the main thread: ``Node.wait`` then stops the node cleanly."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


class ExtraListeners:
    """The parent's supervisor of its extra listener processes.

    Parameters
    ----------
    count
        How many extra listeners (``listeners - 1``).
    config_path
        The parent's config file (None: the embedded defaults), passed on as ``--config``.
    port
        The port the parent bound (a config's port 0 becomes the port the parent was given).
    dispatcher
        The parent's connection dispatcher: each extra listener gets its socket pair from it.
    verbose
        Pass ``--verbose`` on.
    grace_s
        How long a stopping extra listener may take before it is killed.
    """

    def __init__(
        self,
        count: int,
        config_path: Path | None,
        port: int,
        dispatcher: ConnectionDispatcher,
        verbose: bool = False,
        grace_s: float = 20.0,
    ) -> None:
        self.count = count
        self.dispatcher = dispatcher
        self.grace_s = grace_s
        self.config_path = config_path
        self.port = port
        self.verbose = verbose
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._started_at = [0.0] * count
        self._pause = [RESTART_PAUSE_S[0]] * count
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    def command(self) -> list[str]:
        """The command line of one extra listener."""
        cmd = [sys.executable, "-m", "node.cli", "listen", "--extra-listener-of", str(os.getpid())]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd + (["--verbose"] if self.verbose else [])

    def _spawn(self, slot: int) -> None:
        theirs = self.dispatcher.connect(slot)
        env = {**os.environ, "HARMONODE_NODE_PORT": str(self.port), HANDOFF_FD_ENV: str(theirs.fileno())}
        try:  # its log goes to the parent's
            proc = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self._procs[slot], self._started_at[slot] = proc, time.monotonic()
        log.info("extra listener %d started as pid %d on port %d", slot + 1, proc.pid, self.port)

    @property
    def pids(self) -> list[int]:
        """Process ids of the extra listeners running now."""
        return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def start(self) -> None:
        """Start the thread that starts every extra listener, restarts one that exits, and stops them."""
        self._thread = threading.Thread(target=self._supervise, name="extra-listeners", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        """Start, restart and finally stop the extra listeners, all from this one thread.

        One thread because ``PR_SET_PDEATHSIG`` fires when the *thread* that started a child ends: the
        children must not outlive it, nor be killed by the end of a shorter-lived one.
        """
        for slot in range(self.count):
            self._spawn(slot)
        while not self._stop.wait(0.2):
            for slot, proc in enumerate(self._procs):
                if proc is not None and proc.poll() is not None:
                    self._restart(slot, proc)
        self._terminate()

    def _restart(self, slot: int, proc: subprocess.Popen[bytes]) -> None:
        lived = time.monotonic() - self._started_at[slot]
        pause = 0.0 if lived > _STABLE_S else self._pause[slot]
        self._pause[slot] = RESTART_PAUSE_S[0] if lived > _STABLE_S else min(pause * 2, RESTART_PAUSE_S[1])
        log.error(
            "extra listener %d (pid %d) exited with %s after %.0f s: restarting in %.1f s",
            slot + 1,
            proc.pid,
            proc.returncode,
            lived,
            pause,
        )
        self._procs[slot] = None
        self.dispatcher.disconnect(slot)
        if not self._stop.wait(pause):
            self._spawn(slot)
            self.restarts += 1

    def _terminate(self) -> None:
        running = [p for p in self._procs if p is not None and p.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("extra listener pid %d did not stop within %.0f s: killed", proc.pid, self.grace_s)
                proc.kill()
                proc.wait()
        log.info("extra listeners stopped")

    def stop(self) -> None:
        """Stop every extra listener (SIGTERM, then SIGKILL after ``grace_s``), wait for them, close their sockets."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.grace_s + 10)
        self.dispatcher.close()
