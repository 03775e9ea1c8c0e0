"""Every patch the node applies to pynetdicom, in one place, each checked by tests/test_transport.py.

pynetdicom stays the DICOM library; what the node changes in it is here and nowhere else, and each patch has
a test that fails when an upgrade changes what the patch relies on (``PYNETDICOM_CHECKED`` names the
versions they were checked against):

1. Per-association socket tuning (``tune_socket``): Nagle off, a faster receive, a bound on the PDU size,
   the TLS handshake in the connection's own thread under the set-up timeout.
2. The door (``Door.install``): who may open a connection at all, and how many, before anything is read.
3. A request pynetdicom cannot turn into a service call gets a failure status (``answer_invalid_requests``).
4. A DIMSE message that grows past the dataset cap aborts its association (``bound_datasets``): pynetdicom
   gathers a message's fragments in memory without a limit.
5. Sending stored files as stored (``send_stored_files``, ``StoredInstance``, ``enable_raw_sending``).
6. Reactors that wait instead of polling (``wait_instead_of_polling``, installed by ``tune_socket``).
7. Connections handed to extra listener processes (``hand_over_connections`` in the parent,
   ``HandedOverServer`` in each extra listener): the parent accepts, the least busy process serves.
8. P-DATA sent from the thread that sends the message (``send_data_directly``, installed by ``tune_socket``).
9. Fewer pending C-MOVE / C-GET responses (``thin_pending_responses``): at most one per interval.
10. A stored file's C-STORE request written in one go (``send_stored_files``, ``p_data_stream``): the
    command set and the file's bytes after its file meta, as P-DATA PDUs the peer's maximum length allows,
    in one ``sendall`` from the sending thread; the file meta is read from the file's bytes, not parsed by
    pydicom, and the command set encoded directly when no handler wants the DIMSE message. Plain sockets
    with direct P-DATA (item 8) only; anything else takes pynetdicom's own path.
11. pynetdicom's standard logging handlers unbound from every tuned association when its logger would drop
    what they log (``skip_unlogged_messages``, installed by ``tune_socket`` and ``send_stored_files``).
12. A C-STORE response's command set encoded directly and written in one go (``answer_stores_directly``,
    installed by ``tune_socket`` on plain sockets), when no handler wants the DIMSE message.

Long because every pynetdicom patch stays isolated in this one module (issue 24's condition): an upgrade
re-checks one file against ``tests/test_transport.py``, not a scatter of them.

Reactors: each association has two threads that poll: the DUL sleeps ``_run_loop_delay`` between looks at
its socket and queues, the association's reactor sleeps 1 ms between looks for a decoded message. A store
response waits for both, and each idle loop costs CPU the sender needs on a small machine (about a quarter
of the node's CPU with four associations pushing). The patch makes those two sleeps waits that end when
there is work: the DUL waits on its socket and an eventfd that ``send_pdu``/``stop_dul`` signal, the reactor
on its DIMSE message queue; both wait at most ``REACTOR_WAIT_CAP_S``, so timers and release checks keep
running. Only the two calls are changed (recognised by the thread that makes them and the delay they ask
for); every other sleep in pynetdicom sleeps as before.

Socket tuning: pynetdicom reads each PDU in 4 KiB ``recv`` calls from Python and trusts the length a peer
declares; a 128 KiB P-DATA PDU costs 32 calls, and a peer that declares a 4 GiB PDU can make it buffer
whatever it streams. On each new association socket (``EVT_CONN_OPEN``) the node sets TCP_NODELAY and
replaces that socket's ``recv`` with one that reads in large chunks, grows its buffer only as bytes arrive
(a declared length costs nothing until it is sent) and refuses a declared length above ``max_pdu_bytes``
(the connection is then closed as a transport error). TLS sockets get the same receive.

The door: pynetdicom counts a connection that has not yet sent its A-ASSOCIATE-RQ as an association,
waits ``acse_timeout`` for it, checks the address allow-list only after reading the request, and does the
TLS handshake in its one accept loop. Twenty idle or slow-dripping sockets then lock every peer out, and
one idle plain-TCP socket on the TLS port blocks every TLS client. The door admits a connection only from
an allowed address and within per-address and total caps (connections still negotiating are capped
apart from established ones), closes a refused socket at once, and moves the TLS handshake out of the
accept loop.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom import association as _association_module
from pynetdicom import dul as _dul_module
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

#: The pynetdicom releases whose internals the patches below were read against (``major.minor``).
PYNETDICOM_CHECKED = ("3.0",)

DEFAULT_MAX_PDU_BYTES = 64 * 1024 * 1024  # far above any real PDU (DCMTK's largest is 128 KiB)
_RECV_STEP = 1024 * 1024  # a PDU's buffer grows by at most this much per read


DUL_POLL_SECONDS = 0.0002


class PduTooLarge(OSError):
    """A peer declared a PDU larger than the node accepts."""


def _make_recv(max_pdu_bytes: int):  # noqa: ANN202 - returns a bound-method-shaped function
    def recv(self: Any, nr_bytes: int) -> bytearray:
        if nr_bytes > max_pdu_bytes:
            log.warning("peer declared a %d-byte PDU (limit %d): closing the connection", nr_bytes, max_pdu_bytes)
            raise PduTooLarge(f"PDU of {nr_bytes} bytes refused")
        buf = bytearray(min(nr_bytes, _RECV_STEP))
        got = 0
        sock: socket.socket = self.socket
        while got < nr_bytes:
            if got == len(buf):  # grow only as bytes arrive: a declared length alone allocates nothing
                buf.extend(bytes(min(nr_bytes - got, _RECV_STEP)))
            with memoryview(buf) as view:
                n = sock.recv_into(view[got:], len(buf) - got)
            if n == 0:  # connection closed: return what arrived, as pynetdicom does
                return buf[:got]
            got += n
        return buf

    return recv


def tune_socket(
    event: evt.Event, max_pdu_bytes: int = DEFAULT_MAX_PDU_BYTES, setup_timeout_s: float | None = None
) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY, bounded growing receive, and a TLS handshake under a deadline.

    A TLS socket the door accepted without its handshake does it here, in the connection's own thread,
    within ``setup_timeout_s``; a peer that does not complete it is closed (its association then ends).
    """
    assoc_sock = getattr(event.assoc.dul, "socket", None)
    raw = getattr(assoc_sock, "socket", None)
    if assoc_sock is None or raw is None:
        return
    if isinstance(raw, ssl.SSLSocket) and not _handshake(raw, setup_timeout_s):
        return
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    if isinstance(raw, socket.socket):  # SSLSocket is one too: recv_into decrypts into the buffer
        assoc_sock.recv = types.MethodType(_make_recv(max_pdu_bytes), assoc_sock)
    _end_waits_with_the_connection(event.assoc.dul)
    # The DUL thread sleeps this long whenever it finds nothing to do (1 ms by default): a store
    # response waits for it. A shorter poll costs some idle CPU per open association, which is short-lived.
    dul = event.assoc.dul
    if hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = DUL_POLL_SECONDS
    if not isinstance(raw, ssl.SSLSocket):  # TLS may hold decrypted bytes select() cannot see: it polls
        wait_instead_of_polling(event.assoc, raw)
        send_data_directly(event.assoc)  # an SSL object must not be written and read by two threads at once
        answer_stores_directly(event.assoc)
    skip_unlogged_messages(event.assoc)


# -- P-DATA from the sending thread ------------------------------------------------------------------------
_ESTABLISHED_STATE = "Sta6"


def send_data_directly(assoc: Association) -> None:
    """Let the thread that sends a DIMSE message write its P-DATA PDUs to the socket itself.

    pynetdicom queues every PDU for the DUL thread, which sends one per turn of its loop: a 0.5 MB instance
    in 16 KiB PDUs is 32 hand-offs between threads (and GIL switches) before its response can come. Here a
    P-DATA primitive is encoded and sent at once by the caller, under a lock the DUL's own sends take too,
    while the association is established (``Sta6``) and no P-DATA the DUL still has to send is queued (so
    PDUs never overtake each other); any other primitive, and P-DATA in any other state, take the queue as
    before. ``EVT_PDU_SENT`` is triggered as the DUL triggers it. Plain sockets only (see ``tune_socket``).
    """
    dul = assoc.dul
    if getattr(dul, "_harmonode_direct", False):
        return
    lock = threading.Lock()
    queued = [0]  # P-DATA primitives in the DUL's queue, not yet sent
    original_send_pdu, original_send = dul.send_pdu, dul._send

    def send_pdu(self: Any, primitive: Any) -> None:
        if isinstance(primitive, P_DATA):
            with lock:
                sock = self.socket
                if not queued[0] and sock is not None and self.state_machine.current_state == _ESTABLISHED_STATE:
                    pdu = P_DATA_TF(primitive)
                    sock.send(pdu.encode())  # a failure puts Evt17 in the DUL's event queue, as for its own sends
                    evt.trigger(self.assoc, evt.EVT_PDU_SENT, {"pdu": pdu})
                    return
                queued[0] += 1
        original_send_pdu(primitive)

    def send(self: Any, pdu: Any) -> None:
        with lock:
            original_send(pdu)
            if queued[0] and isinstance(pdu, P_DATA_TF):
                queued[0] -= 1

    def send_whole(stream: bytes) -> bool:
        """Write a message's encoded P-DATA PDUs at once; False (nothing sent) where ``send_pdu`` would queue."""
        with lock:
            assoc_sock = dul.socket
            raw = getattr(assoc_sock, "socket", None)
            if queued[0] or raw is None or dul.state_machine.current_state != _ESTABLISHED_STATE:
                return False
            try:
                raw.sendall(stream)
            except OSError:
                assoc_sock.event_queue.put("Evt17")  # what AssociationSocket.send does when a send fails
                return True
            evt.trigger(dul.assoc, evt.EVT_DATA_SENT, {"data": stream})
            return True

    dul.send_pdu = types.MethodType(send_pdu, dul)  # type: ignore[method-assign]
    dul._send = types.MethodType(send, dul)  # type: ignore[method-assign]
    dul._harmonode_direct = True  # type: ignore[attr-defined]
    dul._harmonode_send_whole = send_whole  # type: ignore[attr-defined]
    # A response now arrives fast enough to meet pynetdicom's reactor on its way out of its pause, where it
    # takes the response as a request ("unexpected C-STORE service message"): pause it for sure.
    assoc._reactor_checkpoint = _ParkingCheckpoint(assoc)  # type: ignore[assignment]


PARK_WAIT_CAP_S = 0.02  # the longest ``clear`` waits for the reactor to park (it may be serving a request)
PARK_GRACE_S = 0.005  # a reactor released by another thread's ``set`` stays parked this long for its next send


class _ParkingCheckpoint:
    """``Association._reactor_checkpoint`` (a ``threading.Event``) whose ``clear`` waits until the reactor is
    parked in ``wait``.

    pynetdicom's ``send_*`` methods clear the checkpoint and then wait for ``_is_paused``, which the reactor
    sets just *before* it looks at the checkpoint: a reactor that has passed the look but not yet reset the
    flag still takes the next decoded message off the queue, the response the sender waits for. Cleared from
    another thread, this one returns once the reactor is blocked in ``wait`` (or after ``PARK_WAIT_CAP_S``,
    when the reactor is busy serving a request and pauses no more than pynetdicom's own pause). Set from
    another thread, it lets the reactor go only after ``PARK_GRACE_S`` without a new ``clear``: a sender of
    many messages in a row (C-MOVE sub-operations) finds it parked instead of waiting for its 1 ms poll.
    """

    def __init__(self, assoc: Association) -> None:
        self._assoc = assoc
        self._cond = threading.Condition()
        self._flag = True
        self._parked = False
        self._grace_until = 0.0

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._cond:
            self._flag = True
            if threading.current_thread() is not self._assoc:
                self._grace_until = time.monotonic() + PARK_GRACE_S
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False
            if threading.current_thread() is self._assoc or not self._assoc.is_alive():
                return
            deadline = time.monotonic() + PARK_WAIT_CAP_S
            while not self._parked and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._parked = True
            self._cond.notify_all()
            while not getattr(self._assoc, "_kill", False):
                now = time.monotonic()
                if self._flag and now >= self._grace_until:
                    break
                if deadline is not None and now >= deadline:
                    break
                waits = [t - now for t in (deadline, self._grace_until if self._flag else None) if t is not None]
                self._cond.wait(min(waits) if waits else None)
            self._parked = False
            return self._flag


# -- fewer pending retrieve responses ---------------------------------------------------------------------
PENDING_INTERVAL_S = 0.1  # the most often a C-MOVE or C-GET SCP tells its caller how far it has got
_PENDING = 0xFF00


def thin_pending_responses(assoc: Association, interval_s: float = PENDING_INTERVAL_S) -> None:
    """Send a pending C-MOVE / C-GET response at most once per ``interval_s`` (the first one at once).

    PS3.4 C.4.2.3 / C.4.3.3: the SCP *may* send pending responses while the sub-operations run; the final
    response carries the counts and the failed SOP Instance UID list. pynetdicom sends one after every
    sub-operation, each a command set to encode and send between two C-STOREs. Here the ones that follow the
    last sent one within ``interval_s`` are dropped; every other message goes as before. Idempotent.
    """
    dimse = getattr(assoc, "dimse", None)
    if dimse is None or getattr(dimse, "_harmonode_thinned", False):
        return
    original = dimse.send_msg
    last_sent = [float("-inf")]

    def send_msg(self: Any, primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_MOVE | C_GET) and primitive.Status == _PENDING:
            now = time.monotonic()
            if now - last_sent[0] < interval_s:
                return
            last_sent[0] = now
        original(primitive, context_id)

    dimse.send_msg = types.MethodType(send_msg, dimse)  # type: ignore[method-assign]
    dimse._harmonode_thinned = True  # type: ignore[attr-defined]


# -- reactors that wait ------------------------------------------------------------------------------------
REACTOR_WAIT_CAP_S = 0.01  # the longest a reactor waits without work (its timers and checks run this often)
_ASSOCIATION_POLL_S = 0.001  # what Association._run_reactor sleeps between looks (pynetdicom 3.0)


class _ReactorClock:
    """Stands for the ``time`` module in pynetdicom's dul and association modules.

    ``sleep`` called by a thread that carries a ``_harmonode_idle_wait`` (a DUL or an association that
    ``wait_instead_of_polling`` prepared), with the delay of its reactor loop, waits for work instead;
    every other call is the ``time`` module's own.
    """

    def __init__(self, poll_s: float) -> None:
        self._poll_s = poll_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds == self._poll_s:
            wait = getattr(threading.current_thread(), "_harmonode_idle_wait", None)
            if wait is not None:
                wait()
                return
        time.sleep(seconds)


def _install_clocks() -> None:
    """Put the reactor clocks in place (once per process; idempotent)."""
    if not isinstance(_dul_module.time, _ReactorClock):
        _dul_module.time = _ReactorClock(DUL_POLL_SECONDS)  # type: ignore[assignment]
    if not isinstance(_association_module.time, _ReactorClock):
        _association_module.time = _ReactorClock(_ASSOCIATION_POLL_S)  # type: ignore[assignment]


def wait_instead_of_polling(assoc: Association, raw: socket.socket) -> None:
    """Make the DUL and the association reactor of ``assoc`` wait for work instead of polling.

    The DUL thread waits until its socket is readable or a primitive was queued for it (``send_pdu``,
    ``stop_dul`` write to an eventfd); the association thread until a decoded message is queued; neither
    longer than ``REACTOR_WAIT_CAP_S``.
    """
    dul = assoc.dul
    if getattr(dul, "_harmonode_idle_wait", None) is not None or not hasattr(os, "eventfd"):
        return
    _install_clocks()
    wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    closed = threading.Event()

    def wake() -> None:
        if not closed.is_set():
            try:
                os.eventfd_write(wake_fd, 1)
            except OSError:
                pass

    def dul_wait() -> None:
        if dul._kill_thread or not dul.to_provider_queue.empty() or not dul.event_queue.empty():
            return
        try:
            readable, _, _ = select.select([raw, wake_fd], [], [], REACTOR_WAIT_CAP_S)
        except (OSError, ValueError):  # the socket is closed: let the DUL find out its own way
            time.sleep(DUL_POLL_SECONDS)
            return
        if wake_fd in readable:
            try:
                os.eventfd_read(wake_fd)
            except OSError:
                pass

    original_send, original_stop = dul.send_pdu, dul.stop_dul

    def send_pdu(self: Any, primitive: Any) -> None:
        original_send(primitive)
        wake()

    def stop_dul(self: Any) -> bool:
        if self.state_machine.current_state == _IDLE_STATE:
            self._kill_thread = True  # what stop_dul sets: set before the wake so the DUL sees it
            wake()
        return bool(original_stop())

    def finish() -> None:
        closed.set()
        os.close(wake_fd)

    messages: queue.Queue[Any] = assoc.dimse.msg_queue

    def association_wait() -> None:
        with messages.not_empty:
            if not messages.queue:
                messages.not_empty.wait(REACTOR_WAIT_CAP_S)

    dul.send_pdu = types.MethodType(send_pdu, dul)  # type: ignore[method-assign]
    dul.stop_dul = types.MethodType(stop_dul, dul)  # type: ignore[method-assign]
    dul._harmonode_idle_wait = dul_wait  # type: ignore[attr-defined]
    if assoc.is_acceptor:
        # A requestor's send_* pauses its reactor and waits for it to reach the pause point: a waiting
        # association reactor would hold every sub-operation up by the cap. Its DUL waits; it polls.
        assoc._harmonode_idle_wait = association_wait  # type: ignore[attr-defined]
    weakref.finalize(dul, finish)


_IDLE_STATE = "Sta1"  # the DUL's state once the transport connection is gone
_WAIT_STEP_S = 0.1


def _end_waits_with_the_connection(dul: Any) -> None:
    """Let the association stop waiting for a PDU once its connection is gone.

    A peer that closes its connection before sending its A-ASSOCIATE-RQ puts the DUL back to idle (AA-5)
    without telling the association, whose thread then waits out the whole ``acse_timeout``: a flood of
    short connections leaves hundreds of threads (a quarter of a MiB each) waiting. The wait is taken in
    short steps and ends as soon as the DUL is idle and the socket closed.
    """
    original = dul.receive_pdu

    def receive_pdu(self: Any, wait: bool = False, timeout: float | None = None) -> Any:
        if not wait or timeout is None or timeout <= _WAIT_STEP_S:
            return original(wait, timeout)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            primitive = original(True, max(0.0, min(_WAIT_STEP_S, remaining)))
            if primitive is not None or remaining <= _WAIT_STEP_S:
                return primitive
            if self.state_machine.current_state == _IDLE_STATE and _closed(self.socket) and self.to_user_queue.empty():
                return None

    dul.receive_pdu = types.MethodType(receive_pdu, dul)


def _closed(assoc_sock: Any) -> bool:
    """Whether an AssociationSocket's connection is closed (before it opens, it is not)."""
    raw = getattr(assoc_sock, "socket", None)
    return raw is None or raw.fileno() == -1


def _handshake(sock: ssl.SSLSocket, timeout_s: float | None) -> bool:
    """Complete a server-side TLS handshake within ``timeout_s`` (False, and the socket closed, if not)."""
    if getattr(sock, "_harmonode_handshaken", True):
        return True  # wrapped by pynetdicom itself (handshake done at accept) or already done
    previous = sock.gettimeout()
    try:
        sock.settimeout(timeout_s)
        sock.do_handshake()
        sock._harmonode_handshaken = True  # type: ignore[attr-defined]
        return True
    except (OSError, ssl.SSLError) as exc:
        log.warning("TLS handshake with %s failed: %s", _peer_host(sock), type(exc).__name__)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        return False
    finally:
        if not sock._closed:  # type: ignore[attr-defined]
            sock.settimeout(previous)


def _peer_host(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


# -- the door ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DoorPolicy:
    """Who may connect, and how many at once (``[node]``)."""

    allowed_addresses: tuple[str, ...] = ()  # empty: any address
    max_associations: int = 16  # established associations (pynetdicom's own cap counts negotiating ones too)
    max_connections: int = 64  # open sockets in all, negotiating or established
    max_per_address: int = 16  # open sockets from one address
    max_negotiating: int = 16  # sockets that have not completed association, in all
    max_negotiating_per_address: int = 4  # ... and from one address

    @property
    def pynetdicom_limit(self) -> int:
        """``AE.maximum_associations``: out of the way, since pynetdicom counts every live acceptor thread
        (negotiating, and evicted ones still ending) as an association; the door enforces the caps."""
        return 10 * (self.max_connections + self.max_negotiating)


class Door:
    """Admission of connections to a pynetdicom server, decided at accept, before a byte is read.

    ``install`` patches three methods of the server: ``verify_request`` (admit or close at once),
    ``shutdown_request`` (count a connection out) and ``get_request`` (TLS wrap without the handshake,
    which ``tune_socket`` does in the connection's thread). ``established`` (bound to ``EVT_ESTABLISHED``)
    moves a connection from negotiating to established; ``requested`` (``EVT_REQUESTED``) rejects an
    association beyond ``max_associations`` established ones (local limit exceeded).
    """

    def __init__(self, policy: DoorPolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._open: dict[int, tuple[str, socket.socket]] = {}  # id(socket) -> (peer address, socket)
        self._negotiating: set[int] = set()
        self.refused = 0  # connections closed at accept
        self.evicted = 0  # negotiating connections closed to admit newer ones

    def _prune(self) -> None:
        """Forget sockets closed on a path that did not call ``shutdown_request`` (a failed handshake)."""
        for key in [k for k, (_, sock) in self._open.items() if sock.fileno() == -1]:
            self._open.pop(key, None)
            self._negotiating.discard(key)

    def counts(self, host: str) -> tuple[int, int]:
        """(open, negotiating) connections of one address."""
        with self._lock:
            self._prune()
            mine = [k for k, (h, _) in self._open.items() if h == host]
            return len(mine), sum(1 for k in mine if k in self._negotiating)

    def _evict_oldest_negotiating(self, host: str | None) -> None:
        """Close the longest-waiting negotiating connection (of ``host``, or of anyone when None)."""
        for key, (h, sock) in self._open.items():  # dicts keep admission order: the first is the oldest
            if key in self._negotiating and (host is None or h == host):
                self._negotiating.discard(key)
                del self._open[key]
                self.evicted += 1
                log.warning("connection from %s still negotiating: closed to admit a newer one", h)
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # its thread's read fails and the association ends
                except OSError:
                    pass
                return

    def admit(self, request: socket.socket, client_address: Any) -> bool:
        """``verify_request``: True to serve the connection; False closes it before anything is read.

        A connection that has not completed association holds a place only until a newer one needs it:
        past the negotiating caps the oldest negotiating connection is closed, so idle, slow-dripping or
        malformed peers cannot keep a real peer (which associates within milliseconds) out.
        """
        host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        policy = self.policy
        why = ""
        with self._lock:
            if policy.allowed_addresses and host not in policy.allowed_addresses:
                why = "address not allowed"
            else:
                self._prune()
                if sum(1 for k in self._negotiating if self._open[k][0] == host) >= policy.max_negotiating_per_address:
                    self._evict_oldest_negotiating(host)
                elif len(self._negotiating) >= policy.max_negotiating:
                    self._evict_oldest_negotiating(None)
                mine = sum(1 for h, _ in self._open.values() if h == host)
                if len(self._open) >= policy.max_connections:
                    why = f"{policy.max_connections} connections open"
                elif mine >= policy.max_per_address:
                    why = f"{policy.max_per_address} connections open from this address"
                else:
                    self._open[id(request)] = (host, request)
                    self._negotiating.add(id(request))
                    return True
            self.refused += 1
        log.warning("connection from %s closed at the door: %s", host, why)
        return False

    def open_count(self) -> int:
        """Connections open through this door now (negotiating or established)."""
        with self._lock:
            self._prune()
            return len(self._open)

    def release(self, request: Any) -> None:
        """Count a connection out (``shutdown_request`` may run twice for one socket)."""
        with self._lock:
            self._open.pop(id(request), None)
            self._negotiating.discard(id(request))

    def established(self, event: evt.Event) -> None:
        """EVT_ESTABLISHED handler: the connection has completed association."""
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        with self._lock:
            self._negotiating.discard(id(sock))

    def requested(self, event: evt.Event) -> None:
        """EVT_REQUESTED handler: reject (transient, local limit exceeded) beyond ``max_associations``."""
        with self._lock:
            self._prune()
            established = len(self._open) - len(self._negotiating)
        if established >= self.policy.max_associations:
            log.warning("association from %s rejected: %d established", event.assoc.requestor.address, established)
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)

    def install(self, server: Any) -> None:
        """Patch a started ``AssociationServer`` (pynetdicom's ``AE.start_server(block=False)``)."""
        door = self
        original_shutdown = server.shutdown_request

        def verify_request(self: Any, request: socket.socket, client_address: Any) -> bool:
            return door.admit(request, client_address)

        def shutdown_request(self: Any, request: Any) -> None:
            door.release(request)
            original_shutdown(request)

        def get_request(self: Any) -> tuple[socket.socket, Any]:
            client, address = self.socket.accept()
            if self.ssl_context:
                client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
                client._harmonode_handshaken = False
            return client, address

        server.verify_request = types.MethodType(verify_request, server)
        server.shutdown_request = types.MethodType(shutdown_request, server)
        if not isinstance(server, HandedOverServer):  # its connections come from the parent, not accept()
            server.get_request = types.MethodType(get_request, server)


# -- requests pynetdicom cannot serve ------------------------------------------------------------------
INVALID_REQUEST = 0xC214  # Error: cannot understand (the request's command set is unusable)


def answer_invalid_requests(event: evt.Event, quarantine: Callable[..., Any] | None = None) -> None:
    """EVT_CONN_OPEN handler: a request pynetdicom finds invalid is answered with a failure, not ignored.

    pynetdicom drops a request whose command set lacks a required value (an empty, blank, NUL or over-long
    Affected SOP Instance UID makes it None) with a warning, and the peer waits out its DIMSE timeout.
    Such a request gets ``INVALID_REQUEST`` at once; a C-STORE's data set is quarantined through
    ``quarantine(data, reason, context)`` when given. A request without a Message ID cannot be answered:
    the association is aborted.
    """
    assoc = event.assoc
    original = assoc._serve_request

    def serve_request(self: Association, msg: Any, context_id: int) -> None:
        if msg.is_valid_request or self._sent_release:
            return original(msg, context_id)
        kind = type(msg).__name__
        if getattr(msg, "MessageID", None) is None:
            log.warning("%s request without a Message ID from %s: aborting", kind, self.requestor.address)
            self.abort()
            return None
        log.warning("invalid %s request from %s refused (0x%04X)", kind, self.requestor.address, INVALID_REQUEST)
        data = getattr(msg, "DataSet", None)
        if quarantine is not None and hasattr(data, "getvalue"):
            quarantine(data.getvalue(), f"invalid {kind} request: its command set is incomplete or malformed",
                       {"calling_ae": self.requestor.ae_title, "status": f"0x{INVALID_REQUEST:04X}"})  # fmt: skip
        rsp = type(msg)()
        rsp.MessageIDBeingRespondedTo = msg.MessageID
        if getattr(msg, "AffectedSOPClassUID", None):
            rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
        rsp.Status = INVALID_REQUEST
        self.dimse.send_msg(rsp, context_id)
        return None

    assoc._serve_request = types.MethodType(serve_request, assoc)  # type: ignore[method-assign]


def bound_datasets(event: evt.Event, max_bytes: int) -> None:
    """EVT_CONN_OPEN handler: abort an association whose DIMSE message grows past ``max_bytes``.

    pynetdicom keeps a message's data set fragments in memory until the last one; without a bound one peer
    can stream until the node runs out of memory. The message is dropped and the association aborted (a
    status cannot be sent before the peer has sent the whole message).
    """
    if max_bytes <= 0:
        return
    dimse = event.assoc.dimse
    original = dimse.receive_primitive

    def receive_primitive(self: Any, primitive: Any) -> None:
        if getattr(self, "_harmonode_over_cap", False):
            return  # the rest of an oversized message: dropped while the abort goes out
        original(primitive)
        message = self.message
        data = getattr(message, "data_set", None)
        if data is not None and hasattr(data, "tell") and data.tell() > max_bytes:
            log.warning(
                "a DIMSE message from %s passed %d bytes: association aborted", self.assoc.requestor.address, max_bytes
            )
            self.message = None
            self._harmonode_over_cap = True
            # This runs in the DUL's own thread, which abort() waits for: abort from another thread.
            threading.Thread(target=self.assoc.abort, name="harmonode-abort", daemon=True).start()

    dimse.receive_primitive = types.MethodType(receive_primitive, dimse)


# -- sending stored files as stored -----------------------------------------------------------------------
def enable_raw_sending() -> None:
    """Make pynetdicom send a file path's encoded dataset as is (process-wide; set once by the node).

    pynetdicom sends a Part 10 file's bytes without decoding them only in its chunked mode
    (``_config.STORE_SEND_CHUNKED_DATASET``); every object the node sends (delivery, C-MOVE, C-GET) is a
    stored file.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True


class StoredInstance(Dataset):
    """A sub-operation's instance, named by its stored file; sent as the file's bytes, never re-encoded."""

    def __init__(self, path: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        object.__setattr__(self, "stored_path", path)
        object.__setattr__(self, "stored_syntax", transfer_syntax_uid)


def _send_stored(original: Callable[..., Dataset]) -> Callable[..., Dataset]:
    """Wrap an association's ``send_c_store`` so a ``StoredInstance`` goes as its file's encoded bytes."""

    def send_c_store(
        self: Association,
        dataset: Any,
        msg_id: int = 1,
        priority: int = 2,
        originator_aet: str | None = None,
        originator_id: int | None = None,
    ) -> Dataset:
        if not isinstance(dataset, StoredInstance):
            return original(dataset, msg_id, priority, originator_aet, originator_id)
        path = dataset.stored_path
        context = next(
            (
                cx
                for cx in self.accepted_contexts
                if cx.as_scu
                and cx.abstract_syntax == dataset.SOPClassUID
                and cx.transfer_syntax[0] == dataset.stored_syntax
            ),
            None,
        )
        if context is None:  # the peer accepted another transfer syntax: decode once and let pynetdicom convert
            log.debug("no exact presentation context for %s: sending converted", dataset.SOPInstanceUID)
            return original(dcmread(path), msg_id, priority, originator_aet, originator_id)
        enable_raw_sending()  # the exact context exists: the file's dataset goes as encoded
        if getattr(self.dul, "_harmonode_send_whole", None) is not None and self.is_established:
            status = _store_whole(self, dataset, context.context_id, msg_id, priority, originator_aet, originator_id)
            if status is not None:
                return status
        return original(path, msg_id, priority, originator_aet, originator_id)

    return send_c_store


MAX_WHOLE_BYTES = 16 * 1024 * 1024  # larger files go as pynetdicom sends them, a PDU at a time (memory: twice this)
_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_P_DATA_HEADER = struct.Struct(">BBLLBB")  # PDU type, reserved, PDU length, PDV item length, context ID, control


def read_stored(path: Path, transfer_syntax_uid: str) -> tuple[bytes, int] | None:
    """A stored Part 10 file's bytes and where its dataset starts (after the file meta).

    None when the file cannot go whole: larger than ``MAX_WHOLE_BYTES``, without a preamble and ``DICM``,
    a file meta that is not explicit VR little endian group 0002, or a file meta transfer syntax other than
    ``transfer_syntax_uid``. The offset is where pydicom's ``split_dataset`` would put it: after the last
    group 0002 element.
    """
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_WHOLE_BYTES:
                return None
            data = f.read()
    except OSError:
        return None
    if data[128:132] != b"DICM":
        return None
    pos, syntax = 132, None
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 2:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_LENGTH_VRS:
            if pos + 12 > len(data):
                return None
            (length,) = struct.unpack_from("<L", data, pos + 8)
            header = 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            header = 8
        if length == 0xFFFFFFFF or pos + header + length > len(data):
            return None
        if element == 0x0010:
            syntax = data[pos + header : pos + header + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos += header + length
    if syntax != transfer_syntax_uid:
        return None
    return data, pos


def p_data_stream(
    context_id: int, command: bytes, dataset: bytes | memoryview | None, max_pdu_length: int
) -> bytes:
    """A DIMSE message's P-DATA-TF PDUs, encoded, one PDV each: what pynetdicom's ``encode_msg`` would send.

    The command set's fragments carry control bits 01 and, the last, 11; the data set's (when there is
    one) 00 and 10 (PS3.8 E.2). Each PDU's length (``max_pdu_length``, the peer's maximum; 0 for none) is
    the PDV item with its 4-byte length field.
    """
    parts: list[bytes | memoryview] = []
    pieces = [(memoryview(command), 0x01, 0x03)]
    if dataset is not None:
        pieces.append((memoryview(dataset), 0x00, 0x02))
    for data, more, last in pieces:
        step = len(data) if max_pdu_length == 0 else max_pdu_length - 6
        count = max(1, -(-len(data) // step)) if step else 1
        for i in range(count):
            fragment = data[i * step : (i + 1) * step]
            control = last if i == count - 1 else more
            parts.append(_P_DATA_HEADER.pack(4, 0, len(fragment) + 6, len(fragment) + 2, context_id, control))
            parts.append(fragment)
    return b"".join(parts)


def _element(element: int, value: bytes, pad: bytes) -> bytes:
    """A group 0000 element, implicit VR little endian, its value padded to an even length."""
    if len(value) % 2:
        value += pad
    return struct.pack("<HHL", 0, element, len(value)) + value


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHLH", 0, element, 2, value)


def _command_set(body: list[bytes]) -> bytes:
    """Group length first, then the elements (in tag order), as pynetdicom encodes a command set."""
    encoded = b"".join(body)
    return struct.pack("<HHLL", 0, 0x0000, 4, len(encoded)) + encoded


def store_command(req: C_STORE) -> bytes:
    """The command set of a C-STORE request (PS3.7 9.3.1.1), encoded as pynetdicom encodes it (implicit VR
    little endian, an unset optional element left out)."""
    body = [
        _element(0x0002, str(req.AffectedSOPClassUID).encode("ascii"), b"\0"),
        _us(0x0100, 0x0001),  # Command Field: C-STORE-RQ
        _us(0x0110, req.MessageID),
        _us(0x0700, req.Priority),
        _us(0x0800, 0x0001),  # Command Data Set Type: a data set follows
        _element(0x1000, str(req.AffectedSOPInstanceUID).encode("ascii"), b"\0"),
    ]
    if req.MoveOriginatorApplicationEntityTitle is not None:
        body.append(_element(0x1030, req.MoveOriginatorApplicationEntityTitle.encode("ascii"), b" "))
    if req.MoveOriginatorMessageID is not None:
        body.append(_us(0x1031, req.MoveOriginatorMessageID))
    return _command_set(body)


def store_response_command(rsp: C_STORE) -> bytes | None:
    """The command set of a C-STORE response (PS3.7 9.3.1.2) as pynetdicom encodes it; None for a response
    that carries an Offending Element or an Error Comment (pynetdicom encodes those)."""
    if rsp.OffendingElement is not None or rsp.ErrorComment is not None or rsp.Status is None:
        return None
    body = []
    if rsp.AffectedSOPClassUID is not None:
        body.append(_element(0x0002, str(rsp.AffectedSOPClassUID).encode("ascii"), b"\0"))
    body += [
        _us(0x0100, 0x8001),  # Command Field: C-STORE-RSP
        _us(0x0120, rsp.MessageIDBeingRespondedTo),
        _us(0x0800, 0x0101),  # Command Data Set Type: none
        _us(0x0900, rsp.Status),
    ]
    if rsp.AffectedSOPInstanceUID is not None:
        body.append(_element(0x1000, str(rsp.AffectedSOPInstanceUID).encode("ascii"), b"\0"))
    return _command_set(body)


def answer_stores_directly(assoc: Association) -> None:
    """Send a C-STORE response's command set, encoded directly, in one write (installed by ``tune_socket``).

    Taken when no handler wants the DIMSE message (``skip_unlogged_messages`` unbinds pynetdicom's logging
    one) and the DUL's direct path can write now (``send_data_directly``); any other message, or a
    response with an Error Comment or Offending Element, goes through pynetdicom's ``send_msg``.
    """
    dimse = getattr(assoc, "dimse", None)
    if dimse is None or getattr(dimse, "_harmonode_store_answers", False):
        return
    original = dimse.send_msg

    def send_msg(self: Any, primitive: Any, context_id: int) -> None:
        send_whole = getattr(assoc.dul, "_harmonode_send_whole", None)
        if (
            send_whole is not None
            and isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and not assoc.get_handlers(evt.EVT_DIMSE_SENT)
            and all(h is standard_pdu_sent_handler for h, _ in assoc.get_handlers(evt.EVT_PDU_SENT))
        ):
            command = store_response_command(primitive)
            if command is not None and send_whole(p_data_stream(context_id, command, None, self.maximum_pdu_size)):
                return
        original(primitive, context_id)

    dimse.send_msg = types.MethodType(send_msg, dimse)  # type: ignore[method-assign]
    dimse._harmonode_store_answers = True  # type: ignore[attr-defined]


def _store_whole(
    assoc: Association,
    instance: StoredInstance,
    context_id: int,
    msg_id: int,
    priority: int,
    originator_aet: str | None,
    originator_id: int | None,
) -> Dataset | None:
    """``Association.send_c_store`` for a stored file, its request written in one go; None: not sent, use
    pynetdicom's own (the file cannot go whole).

    The steps are pynetdicom 3.0's: build the request, pause the reactor, send, wait for the response,
    release the reactor, no response handled as it handles it, the status checked as it checks it.
    """
    stored = read_stored(instance.stored_path, instance.stored_syntax)
    if stored is None:
        return None
    data, offset = stored
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = priority
    req.MoveOriginatorApplicationEntityTitle = originator_aet
    req.MoveOriginatorMessageID = originator_id
    req.AffectedSOPClassUID = instance.SOPClassUID
    req.AffectedSOPInstanceUID = instance.SOPInstanceUID
    req._dataset_path = (instance.stored_path, offset)  # what pynetdicom's send reads, should it have to
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        _send_store_request(assoc, req, context_id, memoryview(data)[offset:])
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)


def _send_store_request(assoc: Association, req: C_STORE, context_id: int, dataset: memoryview) -> None:
    """``DIMSEServiceProvider.send_msg`` for a C-STORE request, its PDUs in one write when the DUL allows."""
    max_pdu = assoc.dimse.maximum_pdu_size
    # Only pynetdicom's own logging handler (which logs nothing for P-DATA) may want each PDU sent.
    whole = all(handler is standard_pdu_sent_handler for handler, _ in assoc.get_handlers(evt.EVT_PDU_SENT))
    if whole and not assoc.get_handlers(evt.EVT_DIMSE_SENT):  # no one to see the message: not built
        if assoc.dul._harmonode_send_whole(p_data_stream(context_id, store_command(req), dataset, max_pdu)):
            return
        whole = False
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    message.context_id = context_id
    evt.trigger(assoc, evt.EVT_DIMSE_SENT, {"message": message})
    if whole:
        command = encode(message.command_set, True, True)
        if assoc.dul._harmonode_send_whole(p_data_stream(context_id, command, dataset, max_pdu)):
            return
    for pdata in message.encode_msg(context_id, max_pdu):
        assoc.dul.send_pdu(pdata)


_STANDARD_LOGGING = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


def skip_unlogged_messages(assoc: Association) -> None:
    """Unbind pynetdicom's standard logging handlers from ``assoc`` when its logger drops what they log.

    They log each message and PDU at INFO and DEBUG only, but format it first: two strings and a decoded
    command set per C-STORE sub-operation. Kept when the ``pynetdicom`` logger is enabled for INFO.
    """
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO) or not hasattr(assoc, "get_handlers"):
        return
    for event, handler in _STANDARD_LOGGING:
        if any(bound is handler for bound, _ in assoc.get_handlers(event)):
            assoc.unbind(event, handler)


def send_stored_files(assoc: Association) -> None:
    """Let ``assoc.send_c_store`` take ``StoredInstance`` markers (idempotent: once per association).

    Its messages are left unlogged where pynetdicom's logger would drop them (``skip_unlogged_messages``).
    """
    if getattr(assoc, "_harmonode_raw_send", False):
        return
    skip_unlogged_messages(assoc)
    assoc.send_c_store = types.MethodType(_send_stored(assoc.send_c_store), assoc)  # type: ignore[method-assign]
    assoc._harmonode_raw_send = True  # type: ignore[attr-defined]


def prepare_store_association(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for associations that carry sub-operations (C-MOVE): socket tuning, raw sending."""
    tune_socket(event)
    send_stored_files(event.assoc)


# -- connections handed to extra listener processes (item 7) -----------------------------------------------
# ``[node] listeners > 1``: the parent alone listens. Its door admits a connection, then the parent either
# serves it or passes the connected socket to the extra listener that serves the fewest (SCM_RIGHTS over a
# Unix socket pair per extra listener, ``node.listeners.ConnectionDispatcher``); nothing has been read from
# it yet, so the extra listener's association starts from the first byte, TLS handshake included. An extra
# listener's server (``HandedOverServer``) takes its connections from that Unix socket instead of
# ``accept``: pynetdicom's ``AssociationServer`` binds and listens in its constructor and accepts in
# ``get_request``, so the subclass replaces those two steps and says, one byte each, when it is ready and
# when a connection it was handed has ended (the parent counts what each one serves).
# Why not SO_REUSEPORT: the kernel spreads connections by a hash of their ports, so four scanners on two
# listeners land 3 + 1 or 4 + 0 five times in eight, and one process then serves most of the work.
from pynetdicom.transport import ThreadedAssociationServer as _ThreadedAssociationServer  # noqa: E402
from pynetdicom.utils import make_target as _make_target  # noqa: E402

HANDOFF_READY = b"r"  # extra listener -> parent: serving
HANDOFF_ENDED = b"x"  # extra listener -> parent: a connection it was handed has ended
HANDOFF_PASSED = b"c"  # parent -> extra listener: this byte carries a connected socket


class HandedOverServer(_ThreadedAssociationServer):
    """An extra listener's association server: connections arrive over ``handoff`` from the parent process.

    Built by ``start_handed_over_server`` (pynetdicom's ``AE.make_server`` with this class); the door's
    ``install`` keeps this class's ``get_request``. A connection counts as ended for the parent when its
    association's connection closes (``EVT_CONN_CLOSE``), or when it is closed before it became one (refused
    at this process's door).
    """

    handoff: socket.socket  # set on the subclass ``start_handed_over_server`` makes

    def server_bind(self) -> None:
        """Use the Unix socket from the parent instead of binding the port (the parent holds it)."""
        self.socket.close()
        self.socket = self.handoff
        self._unopened: set[int] = set()  # connections handed over that have no association yet

    def server_activate(self) -> None:
        """Nothing to listen on: the parent accepts."""

    def get_request(self) -> tuple[socket.socket, Any]:
        """The next connection the parent passed (TLS wrapped, handshake left to ``tune_socket``)."""
        message, fds, _, _ = socket.recv_fds(self.socket, 1, 1)
        if not message:  # the parent closed its end: it is stopping, and so is this process
            self._BaseServer__shutdown_request = True  # serve_forever's own stop flag
            raise OSError("the parent closed the handoff socket")
        client = socket.socket(fileno=fds[0])
        address = client.getpeername()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
            client._harmonode_handshaken = False
        self._unopened.add(id(client))
        return client, address

    def connection_opened(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN: the connection became an association's (its close is reported by the next)."""
        self._unopened.discard(id(getattr(event.assoc.dul.socket, "socket", None)))

    def connection_closed(self, event: evt.Event) -> None:
        """EVT_CONN_CLOSE: tell the parent one fewer connection is served here."""
        self._report_ended()

    def shutdown_request(self, request: Any) -> None:
        """Close a connection as pynetdicom does; one that never became an association is reported ended."""
        super().shutdown_request(request)
        if id(request) in self._unopened:
            self._unopened.discard(id(request))
            self._report_ended()

    def _report_ended(self) -> None:
        try:
            self.handoff.send(HANDOFF_ENDED)
        except OSError:
            pass


def start_handed_over_server(
    ae: Any,
    address: tuple[str, int],
    evt_handlers: list[Any],
    handoff: socket.socket,
    ssl_context: ssl.SSLContext | None = None,
) -> HandedOverServer:
    """``ae.start_server(address, block=False, ...)`` for an extra listener: connections come over ``handoff``.

    The same steps as pynetdicom 3.0's non-blocking ``start_server``: make the server, serve it in a daemon
    thread, keep it in the AE's servers (``ae.shutdown`` stops it); then tell the parent it is ready.
    ``address`` is the parent's (the port this process serves, for its log and status).
    """
    server_class = type("HandedOverServer", (HandedOverServer,), {"handoff": handoff})
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers, server_class=server_class)
    server.server_address = address
    server.bind(evt.EVT_CONN_OPEN, server.connection_opened)
    server.bind(evt.EVT_CONN_CLOSE, server.connection_closed)
    thread = threading.Thread(target=_make_target(server.serve_forever), name="AcceptorServer-handoff", daemon=True)
    thread.start()
    ae._servers.append(server)
    handoff.send(HANDOFF_READY)
    return server


def hand_over_connections(server: Any, door: Door, pass_connection: Callable[[socket.socket], bool]) -> None:
    """Patch the parent's server: an admitted connection goes to ``pass_connection`` before it is served here.

    ``pass_connection`` returns True when it passed the socket to an extra listener: the parent then only
    counts it out of its door and closes its own copy (no shutdown: the connection lives on in the other
    process). False: served here, as pynetdicom's ``process_request`` does.
    """
    original = server.process_request

    def process_request(self: Any, request: socket.socket, client_address: Any) -> None:
        try:
            passed = pass_connection(request)
        except OSError:
            passed = False
        if not passed:
            original(request, client_address)
            return
        door.release(request)
        request.close()

    server.process_request = types.MethodType(process_request, server)
