"""RabbitMQ for the cluster tests: the machine's broker on 127.0.0.1:5672, or one started here.

``Broker`` starts Debian's RabbitMQ (``/usr/lib/rabbitmq/bin/rabbitmq-server``) on free loopback ports with
its node name, data and cookie in a temporary folder, so a test may stop it, wipe what it kept and start it
again (a broker that lost its messages). ``broker_url`` gives the machine's broker when one answers, else
such a broker for the session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from peers import free_port

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
SYSTEM_URL = "amqp://guest:guest@127.0.0.1:5672//"


def answers(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class Broker:
    """A RabbitMQ node of this test's own, on free loopback ports; stop, wipe and start it again at will."""

    def __init__(self, root: Path) -> None:
        if not Path(RABBITMQ_SERVER).is_file():
            message = f"{RABBITMQ_SERVER} is missing: `apt-get install rabbitmq-server` (./dev setup does)"
            raise RuntimeError(message)
        self.root = root
        self.port = free_port()
        self.dist_port = free_port()
        self.name = f"hn{uuid.uuid4().hex[:8]}@localhost"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The AMQP URL of this broker."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        plugins = self.root / "enabled_plugins"
        plugins.write_text("[].\n")
        return {
            **os.environ,
            "HOME": str(self.root / "home"),  # the Erlang cookie is made here
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_CONFIG_FILE": str(self.root / "none"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "none.config"),
        }

    def start(self, timeout: float = 60.0) -> Broker:
        """Start the node and wait until it accepts AMQP connections."""
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(
            [RABBITMQ_SERVER], env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not answers(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"RabbitMQ did not start on port {self.port}:\n{tail}")
            time.sleep(0.2)
        time.sleep(0.5)  # the listener answers a moment before the default user is ready
        return self

    def stop(self) -> None:
        """Kill the node at once (its whole process group: beam and epmd's children), as a crash would."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None
        deadline = time.monotonic() + 10
        while answers(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def wipe(self) -> None:
        """Delete everything the node kept (queues, persistent messages): a broker that lost its disk."""
        shutil.rmtree(self.root / "mnesia", ignore_errors=True)


def system_broker_url() -> str | None:
    """The machine's RabbitMQ (127.0.0.1:5672, guest/guest) when it answers; None otherwise."""
    return SYSTEM_URL if answers(5672) else None


def broker_or_start(root: Path) -> tuple[str, Broker | None]:
    """The machine's broker, or a broker started here when none answers (never a skip in CI)."""
    url = system_broker_url()
    if url is not None:
        return url, None
    broker = Broker(root).start()
    return broker.url, broker
