"""``ConnectionDispatcher``: each admitted connection goes to the process serving the fewest (node.listeners).

The extra listeners here are the other ends of the dispatcher's real Unix socket pairs: what a test reads
from them is what an extra listener would receive (a byte carrying a connected socket).
"""

from __future__ import annotations

import socket

from handlers import transport
from node.listeners import ConnectionDispatcher


class Parent:
    """The parent's own count of open connections, as ``Door.open_count`` gives it (the new one included)."""

    def __init__(self) -> None:
        self.open = 1

    def __call__(self) -> int:
        return self.open


def connection() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def received(child: socket.socket) -> socket.socket | None:
    """The socket a byte from the dispatcher carried, or None when nothing came."""
    child.setblocking(False)
    try:
        message, fds, _, _ = socket.recv_fds(child, 1, 1)
    except BlockingIOError:
        return None
    assert message == transport.HANDOFF_PASSED and len(fds) == 1
    return socket.socket(fileno=fds[0])


def test_nothing_is_passed_to_an_extra_listener_before_it_says_it_is_ready() -> None:
    dispatcher = ConnectionDispatcher(Parent())
    child = dispatcher.connect(0)
    ours, _peer = connection()
    assert not dispatcher.pass_connection(ours)
    assert received(child) is None
    child.send(transport.HANDOFF_READY)
    assert dispatcher.pass_connection(ours)
    assert received(child) is not None


def test_connections_are_spread_two_and_two_and_an_ended_one_frees_a_place() -> None:
    parent = Parent()
    dispatcher = ConnectionDispatcher(parent)
    child = dispatcher.connect(0)
    child.send(transport.HANDOFF_READY)
    pairs = [connection() for _ in range(4)]
    placed = []
    for ours, _ in pairs:  # the parent serves what it does not pass: its count grows
        passed = dispatcher.pass_connection(ours)
        placed.append("child" if passed else "parent")
        parent.open += 0 if passed else 1
    assert placed == ["child", "parent", "child", "parent"]  # a tie goes to the extra listener
    child.send(transport.HANDOFF_ENDED * 2)  # both of its connections ended
    ours, _ = connection()
    assert dispatcher.pass_connection(ours)


def test_the_least_busy_of_several_extra_listeners_gets_the_next_connection() -> None:
    parent = Parent()
    parent.open = 10  # the parent is busy: every connection goes to an extra listener
    dispatcher = ConnectionDispatcher(parent)
    children = [dispatcher.connect(slot) for slot in range(3)]
    for child in children:
        child.send(transport.HANDOFF_READY)
    for _ in range(6):
        ours, _ = connection()
        assert dispatcher.pass_connection(ours)
    counts = []
    for child in children:
        n = 0
        while received(child) is not None:
            n += 1
        counts.append(n)
    assert counts == [2, 2, 2]


def test_a_dead_extra_listener_gets_nothing_and_the_parent_serves() -> None:
    parent = Parent()
    parent.open = 5
    dispatcher = ConnectionDispatcher(parent)
    child = dispatcher.connect(0)
    child.send(transport.HANDOFF_READY)
    child.close()  # it exited
    ours, _ = connection()
    assert not dispatcher.pass_connection(ours)
    again = dispatcher.connect(0)  # restarted: a new pair, not ready until it says so
    assert not dispatcher.pass_connection(ours)
    again.send(transport.HANDOFF_READY)
    assert dispatcher.pass_connection(ours)
    assert dispatcher.passed == 1


def test_a_tls_connection_handed_to_another_node_process_is_served_there(tmp_path) -> None:
    # The parent admits the TLS connection without reading a byte; the other listener wraps it and does the
    # handshake, then answers the C-ECHO. Both are Node objects here, as in the two processes.
    import ssl

    from test_door import echo_seconds

    from builders import tls_files
    from conftest import make_config
    from node.app import Node
    from peers import wait_until

    key, crt = tls_files(tmp_path)
    tls = {"enabled": True, "cert_file": str(crt), "key_file": str(key)}
    parent = Node(make_config(tmp_path / "node", tls=tls, node={"acse_timeout_s": 3.0}))
    parent.start(("listen",))
    extra = Node(make_config(tmp_path / "node", tls=tls, node={"acse_timeout_s": 3.0, "port": parent.port}))
    dispatcher = parent.hand_over_connections()
    extra.start_extra_listener(dispatcher.connect(0))
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(crt))
    try:
        times = [echo_seconds(parent.port, client) for _ in range(3)]
        assert max(times) < 5.0, times
        assert dispatcher.passed >= 1  # a tie goes to the extra listener: the first connection at least

        def gauge() -> list[tuple[dict[str, str], float]]:
            return [
                (sample.labels, sample.value)
                for family in parent.metrics.registry.collect()
                if family.name == "harmonode_listener_connections"
                for sample in family.samples
            ]

        # ready, and serving nothing once the last echo's connection has closed there
        wait_until(lambda: gauge() == [({"listener": "1"}, 0)], timeout=10, what="the listener gauge at 0")
    finally:
        extra.stop()
        parent.stop()
        dispatcher.close()


def test_an_extra_listener_that_stopped_reading_never_blocks_the_accept_loop() -> None:
    parent = Parent()
    parent.open = 100_000  # so busy that every connection would go to the extra listener
    dispatcher = ConnectionDispatcher(parent)
    child = dispatcher.connect(0)
    child.send(transport.HANDOFF_READY)
    ours, _ = connection()
    outcomes = [dispatcher.pass_connection(ours) for _ in range(2_000)]  # it reads none of them
    assert outcomes[0] and not outcomes[-1]  # its socket filled up: the rest are served here, at once
    assert received(child) is not None  # and it is still counted as alive
