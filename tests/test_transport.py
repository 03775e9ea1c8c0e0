"""The pynetdicom patches of handlers/transport.py: each test fails when an upgrade changes what one relies on."""

from __future__ import annotations

import inspect
import os
import socket
import threading
import time

import pynetdicom
import pynetdicom.association
import pynetdicom.dul
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket

from handlers import transport
from peers import free_port


def test_pynetdicom_is_a_release_the_patches_were_read_against() -> None:
    # Upgrading pynetdicom? Re-read the internals named below, then add the release to PYNETDICOM_CHECKED.
    major_minor = ".".join(pynetdicom.__version__.split(".")[:2])
    assert major_minor in transport.PYNETDICOM_CHECKED


def test_socket_patch_relies_on_association_socket_recv_and_the_dul_poll_delay() -> None:
    # tune_socket replaces AssociationSocket.recv(nr_bytes) -> bytearray and sets DUL._run_loop_delay.
    assert list(inspect.signature(AssociationSocket.recv).parameters) == ["self", "nr_bytes"]
    assert "self._run_loop_delay" in inspect.getsource(DULServiceProvider.__init__)
    assert "_run_loop_delay" in inspect.getsource(DULServiceProvider.run_reactor)


def test_raw_sending_relies_on_the_chunked_store_switch_and_accepted_contexts() -> None:
    assert hasattr(_config, "STORE_SEND_CHUNKED_DATASET")
    assert "STORE_SEND_CHUNKED_DATASET" in inspect.getsource(Association)
    params = inspect.signature(Association.send_c_store).parameters
    assert next(iter(params.values())).name == "self" and "dataset" in params
    assert isinstance(inspect.getattr_static(Association, "accepted_contexts"), property)


def test_tuned_socket_has_nagle_off_and_bounded_fast_receive() -> None:
    seen: dict = {}

    def on_open(event: evt.Event) -> None:
        transport.tune_socket(event, max_pdu_bytes=1024)
        sock = event.assoc.dul.socket
        seen["nodelay"] = sock.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        seen["recv_patched"] = sock.recv.__func__ is not AssociationSocket.recv
        seen["delay"] = event.assoc.dul._run_loop_delay

    ae = AE(ae_title="SCP")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000  # the patched receive still reads whole PDUs
        assoc.release()
    finally:
        server.shutdown()
    assert seen == {"nodelay": 1, "recv_patched": True, "delay": transport.DUL_POLL_SECONDS}


def test_send_stored_files_is_idempotent() -> None:
    scu = AE(ae_title="SCU")
    assoc = Association(scu, "requestor")
    transport.send_stored_files(assoc)
    first = assoc.send_c_store
    transport.send_stored_files(assoc)
    assert assoc.send_c_store is first


def test_reactor_wait_relies_on_the_two_poll_sleeps_and_the_queues_they_poll() -> None:
    # wait_instead_of_polling replaces exactly these sleeps (by the thread and the delay) and wakes on these.
    dul_loop = inspect.getsource(DULServiceProvider.run_reactor)
    assert "time.sleep(self._run_loop_delay)" in dul_loop and "_process_recv_primitive" in dul_loop
    assert "time.sleep(0.001)" in inspect.getsource(Association._run_reactor)
    assert transport._ASSOCIATION_POLL_S == 0.001
    assert "self.to_provider_queue.put(primitive)" in inspect.getsource(DULServiceProvider.send_pdu)
    assert "self._kill_thread = True" in inspect.getsource(DULServiceProvider.stop_dul)
    assert "msg_queue.get" in inspect.getsource(DIMSEServiceProvider.get_msg)
    assert hasattr(pynetdicom.dul, "time") and hasattr(pynetdicom.association, "time")  # `import time` in both


def test_waiting_reactors_answer_at_once_and_idle_without_cpu() -> None:
    ae = AE(ae_title="SCP")
    ae.add_supported_context(Verification)
    port = free_port()
    acceptors: list = []

    def on_open(event: evt.Event) -> None:
        transport.tune_socket(event)
        acceptors.append(event.assoc)

    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
        assert assoc.is_established
        [acceptor] = acceptors
        started = time.perf_counter()
        for _ in range(50):
            assert assoc.send_c_echo().Status == 0x0000
        per_echo = (time.perf_counter() - started) / 50
        # the acceptor's two threads, idle for 0.5 s: polling every 0.2 ms would cost ~10 % of a core
        cpu = _thread_cpu_s(acceptor.dul.native_id) + _thread_cpu_s(acceptor.native_id)
        time.sleep(0.5)
        idle = _thread_cpu_s(acceptor.dul.native_id) + _thread_cpu_s(acceptor.native_id) - cpu
        released = time.perf_counter()
        assoc.release()
        acceptor.join(timeout=5)
        assert not acceptor.is_alive() and time.perf_counter() - released < 1.0  # stop_dul wakes the DUL
    finally:
        server.shutdown()
    assert per_echo < 0.05  # a wake, not a wait for the cap (loaded machines still answer in ms)
    assert idle < 0.02, f"idle reactors used {idle:.3f} s of CPU in 0.5 s"
    assert getattr(acceptor.dul, "_harmonode_idle_wait", None) is not None
    assert isinstance(pynetdicom.dul.time, transport._ReactorClock)


def _thread_cpu_s(native_id: int | None) -> float:
    """CPU seconds (user + system) one thread of this process has used (Linux)."""
    fields = open(f"/proc/self/task/{native_id}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- connections handed to extra listener processes (item 7) -------------------------------------------------
def test_handed_over_server_relies_on_the_constructor_binding_and_the_serve_loop_flag() -> None:
    # HandedOverServer replaces server_bind/server_activate (called by TCPServer.__init__, which pynetdicom's
    # AssociationServer.__init__ calls with bind_and_activate=True), get_request and shutdown_request, and
    # stops serve_forever through BaseServer's name-mangled flag.
    import socketserver

    from pynetdicom.transport import AssociationServer

    assert "bind_and_activate=True" in inspect.getsource(AssociationServer.__init__)
    init = inspect.getsource(socketserver.TCPServer.__init__)
    assert "self.server_bind()" in init and "self.server_activate()" in init
    assert "self.__shutdown_request" in inspect.getsource(socketserver.BaseServer.serve_forever)
    assert "server_class" in inspect.signature(AE.make_server).parameters
    assert "self.get_request()" in inspect.getsource(socketserver.BaseServer._handle_request_noblock)


def _echo(port: int) -> int:
    scu = AE(ae_title="SCU")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
    assert assoc.is_established
    status = assoc.send_c_echo().Status
    assoc.release()
    return status


def test_a_connection_passed_over_the_unix_socket_is_served_by_the_other_server() -> None:
    # The parent's server hands every admitted connection over; the other server answers it and says when
    # it is ready and when the connection ended. The parent listens alone: nothing else binds the port.
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent, child = AE(ae_title="SCP"), AE(ae_title="SCP")
    for ae in (parent, child):
        ae.add_supported_context(Verification)
    echoed: list[str] = []

    def on_echo(event: evt.Event) -> int:
        echoed.append(threading.current_thread().name)
        return 0x0000

    port = free_port()
    server = parent.start_server(("127.0.0.1", port), block=False)
    door = transport.Door(transport.DoorPolicy())
    door.install(server)
    handed = transport.start_handed_over_server(child, ("127.0.0.1", port), [(evt.EVT_C_ECHO, on_echo)], theirs)
    passed: list[int] = []

    def pass_connection(request: socket.socket) -> bool:
        socket.send_fds(mine, [transport.HANDOFF_PASSED], [request.fileno()])
        passed.append(request.fileno())
        return True

    try:
        assert mine.recv(1) == transport.HANDOFF_READY
        transport.hand_over_connections(server, door, pass_connection)
        assert _echo(port) == 0x0000 and _echo(port) == 0x0000
        assert len(passed) == 2 and len(echoed) == 2  # both served by the handed-over server's handler
        assert door.open_count() == 0  # the parent counted them out when it passed them
        news = b""
        deadline = time.monotonic() + 10
        while news.count(transport.HANDOFF_ENDED) < 2 and time.monotonic() < deadline:
            news += mine.recv(16)
        assert news.count(transport.HANDOFF_ENDED) == 2
        assert handed.server_address[1] == port
    finally:
        parent.shutdown()
        child.shutdown()
        mine.close()


def test_the_handed_over_server_stops_when_the_parent_closes_its_end() -> None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = AE(ae_title="SCP")
    child.add_supported_context(Verification)
    server = transport.start_handed_over_server(child, ("127.0.0.1", free_port()), [], theirs)
    try:
        assert mine.recv(1) == transport.HANDOFF_READY
        mine.close()
        deadline = time.monotonic() + 10
        while not [t for t in threading.enumerate() if t.name == "AcceptorServer-handoff"] == [] and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert not [t for t in threading.enumerate() if t.name == "AcceptorServer-handoff" and t.is_alive()]
    finally:
        if server in child._servers:
            child.shutdown()


def test_direct_send_relies_on_the_dul_send_path_and_the_p_data_action() -> None:
    # send_data_directly replaces DUL.send_pdu/_send: P-DATA is queued, DT-1 pops it and _send encodes it.
    import pynetdicom.fsm
    from pynetdicom.dimse import DIMSEServiceProvider as Dimse

    assert "self.to_provider_queue.put(primitive)" in inspect.getsource(DULServiceProvider.send_pdu)
    assert "dul._send(P_DATA_TF(primitive))" in inspect.getsource(pynetdicom.fsm.DT_1)
    send = inspect.getsource(DULServiceProvider._send)
    assert "self.socket.send(pdu.encode())" in send and "EVT_PDU_SENT" in send
    assert "self.dul.send_pdu(pdata)" in inspect.getsource(Dimse.send_msg)
    assert "Evt17" in inspect.getsource(AssociationSocket.send)  # a failed send reaches the DUL's state machine


def test_parking_checkpoint_relies_on_the_reactor_pause() -> None:
    # _ParkingCheckpoint stands for Association._reactor_checkpoint (an Event) in the reactor's pause.
    reactor = inspect.getsource(Association._run_reactor)
    assert "self._is_paused = True\n            self._reactor_checkpoint.wait()" in reactor
    store = inspect.getsource(Association.send_c_store)
    assert store.index("self._reactor_checkpoint.clear()") < store.index("while not self._is_paused")
    assert "self._reactor_checkpoint.set()" in store
    assert "self._reactor_checkpoint: threading.Event" in inspect.getsource(Association.__init__)


def test_thinning_relies_on_pending_responses_through_send_msg() -> None:
    # thin_pending_responses drops C_MOVE/C_GET primitives with Status 0xFF00 passed to dimse.send_msg.
    from pynetdicom.service_class import QueryRetrieveServiceClass as QR

    for scp, primitive in ((QR._move_scp, "rsp = C_MOVE()"), (QR._get_scp, "rsp = C_GET()")):
        source = inspect.getsource(scp)
        assert primitive in source and "self.dimse.send_msg(rsp, cx_id)" in source
        assert "rsp.NumberOfRemainingSuboperations = store_results[0]" in source


def test_direct_send_many_stores_without_a_lost_response() -> None:
    """500 C-STOREs from a tuned requestor to a tuned acceptor: every response reaches its sender."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="SCP")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    handlers = [(evt.EVT_CONN_OPEN, transport.tune_socket), (evt.EVT_C_STORE, lambda event: 0x0000)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate(
            "127.0.0.1", port, ae_title="SCP", evt_handlers=[(evt.EVT_CONN_OPEN, transport.tune_socket)]
        )
        assert assoc.is_established and assoc.dul._harmonode_direct
        assert isinstance(assoc._reactor_checkpoint, transport._ParkingCheckpoint)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.BitsAllocated, ds.PixelData = CTImageStorage, 16, b"\0" * 40000  # a few PDUs each
        statuses = []
        for _ in range(500):
            ds.SOPInstanceUID = generate_uid()
            statuses.append(assoc.send_c_store(ds).Status)
        assoc.release()
    finally:
        server.shutdown()
    assert statuses == [0x0000] * 500


def test_thinned_pending_responses_keep_the_first_and_drop_the_rest_within_the_interval() -> None:
    from types import SimpleNamespace

    from pynetdicom.dimse_primitives import C_FIND, C_MOVE

    sent: list = []
    dimse = SimpleNamespace(send_msg=lambda primitive, cx: sent.append(primitive))
    assoc = SimpleNamespace(dimse=dimse)
    transport.thin_pending_responses(assoc, interval_s=60)  # type: ignore[arg-type]
    transport.thin_pending_responses(assoc, interval_s=60)  # type: ignore[arg-type] # idempotent
    for status in (0xFF00, 0xFF00, 0xFF00, 0x0000):
        rsp = C_MOVE()
        rsp.MessageIDBeingRespondedTo, rsp.Status = 1, status
        dimse.send_msg(rsp, 1)
    find = C_FIND()
    find.MessageIDBeingRespondedTo, find.Status = 1, 0xFF00
    dimse.send_msg(find, 1)
    dimse.send_msg(find, 1)  # C-FIND matches are never dropped
    assert [int(p.Status) for p in sent] == [0xFF00, 0x0000, 0xFF00, 0xFF00]


def _stored_file(tmp_path, size: int):  # noqa: ANN001, ANN202 - a small fixture-like helper
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom.sop_class import CTImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = generate_uid()
    ds.PatientName = "WHOLE^SEND"
    ds.BitsAllocated, ds.PixelData = 16, bytes(range(256)) * (size // 256)
    path = tmp_path / f"{size}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def test_read_stored_finds_the_dataset_where_pydicom_does(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom.dsutils import split_dataset

    path, _ = _stored_file(tmp_path, 4096)
    data, offset = transport.read_stored(path, ExplicitVRLittleEndian)
    assert data == path.read_bytes() and offset == split_dataset(path)[1]
    assert transport.read_stored(path, ImplicitVRLittleEndian) is None  # file meta says otherwise: not whole
    headless = tmp_path / "headless.dcm"
    headless.write_bytes(data[132:])
    assert transport.read_stored(headless, ExplicitVRLittleEndian) is None
    monkeypatch.setattr(transport, "MAX_WHOLE_BYTES", len(data) - 1)
    assert transport.read_stored(path, ExplicitVRLittleEndian) is None  # too large to go whole


def test_whole_message_is_byte_for_byte_what_pynetdicom_sends(tmp_path) -> None:  # noqa: ANN001
    # p_data_stream stands for DIMSEMessage.encode_msg of a C-STORE-RQ whose data set is read from a file.
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode
    from pynetdicom.pdu import P_DATA_TF

    for size, max_pdu in ((40000, 16384), (40000, 0), (0, 16384), (100000, 4096), (16378 * 3, 16384)):
        path, ds = _stored_file(tmp_path, size)
        data, offset = transport.read_stored(path, ExplicitVRLittleEndian)
        req = C_STORE()
        req.MessageID, req.Priority = 7, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        req.MoveOriginatorApplicationEntityTitle, req.MoveOriginatorMessageID = "MOVER", 3
        req._dataset_path = (path, offset)
        message = C_STORE_RQ()
        message.primitive_to_message(req)
        theirs = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(5, max_pdu))
        ours = transport.p_data_stream(5, encode(message.command_set, True, True), memoryview(data)[offset:], max_pdu)
        assert ours == theirs, (size, max_pdu)
    for aet, originator_id in (("MOVER", 3), ("ODD", 65535), ("", 1), (None, None), ("SIXTEEN_CHARS_AE", None)):
        req = C_STORE()
        req.MessageID, req.Priority = 65535, 1
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = ds.SOPClassUID, "1.2.3.45"
        req.MoveOriginatorApplicationEntityTitle, req.MoveOriginatorMessageID = aet, originator_id
        req._dataset_path = (path, offset)
        message = C_STORE_RQ()
        message.primitive_to_message(req)
        assert transport.store_command(req) == encode(message.command_set, True, True), (aet, originator_id)


def test_whole_send_relies_on_send_c_store_steps_and_quiet_pdu_logging() -> None:
    # _store_whole repeats Association.send_c_store's steps for a file path; _send_store_request repeats
    # DIMSEServiceProvider.send_msg; P-DATA PDUs sent whole skip EVT_PDU_SENT, whose standard handler is silent.
    from pynetdicom import _handlers
    from pynetdicom.dimse_messages import C_STORE_RQ

    store = inspect.getsource(Association.send_c_store)
    for step in (
        "req.MoveOriginatorApplicationEntityTitle = originator_aet",
        "req._dataset_path = (fpath, offset)",
        'context = self._get_valid_context(\n            sop_class, tsyntax, "scu", allow_conversion=allow_conversion',
        "self.dimse.send_msg(req, cast(int, context.context_id))",
        "cx_id, rsp = self.dimse.get_msg(block=True)",
        "self._handle_no_response()",
        "status = self._check_received_status(rsp)",
    ):
        assert step in store, step
    send_msg = inspect.getsource(DIMSEServiceProvider.send_msg)
    assert "dimse_msg.primitive_to_message(primitive)" in send_msg and "EVT_DIMSE_SENT" in send_msg
    assert 'self._data_set_path = getattr(primitive, "_dataset_path", None)' in inspect.getsource(
        C_STORE_RQ.primitive_to_message
    )
    assert inspect.getsource(_handlers._send_data_tf).rstrip().endswith("return []")
    assert "standard_pdu_sent_handler" in inspect.getsource(Association._bind_defaults)


def test_stored_files_go_whole_and_arrive_as_stored(tmp_path) -> None:  # noqa: ANN001
    """A tuned requestor sends StoredInstances in one write each; the acceptor receives the stored bytes."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage

    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.request.DataSet.getvalue())
        return 0x0000

    answers: list[int] = []  # the acceptor's responses written whole (answer_stores_directly)

    def on_open(event: evt.Event) -> None:
        transport.tune_socket(event)
        send_whole = event.assoc.dul._harmonode_send_whole
        event.assoc.dul._harmonode_send_whole = lambda stream: answers.append(len(stream)) or send_whole(stream)

    ae = AE(ae_title="SCP")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    handlers = [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    whole: list[int] = []
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate(
            "127.0.0.1", port, ae_title="SCP", evt_handlers=[(evt.EVT_CONN_OPEN, transport.prepare_store_association)]
        )
        assert assoc.is_established
        original = assoc.dul._harmonode_send_whole
        assoc.dul._harmonode_send_whole = lambda stream: whole.append(len(stream)) or original(stream)
        files = [_stored_file(tmp_path, size) for size in (0, 40000, 300000)]
        statuses = []
        for path, ds in files:
            instance = transport.StoredInstance(path, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian)
            statuses.append(assoc.send_c_store(instance, msg_id=len(statuses) + 1).Status)
        assoc.release()
    finally:
        server.shutdown()
    assert statuses == [0x0000] * 3 and len(whole) == 3 and len(answers) == 3
    for (path, _), got in zip(files, received, strict=True):
        data, offset = transport.read_stored(path, ExplicitVRLittleEndian)
        assert got == data[offset:]


def test_standard_logging_is_unbound_only_when_its_logger_drops_it() -> None:
    # skip_unlogged_messages relies on the standard handlers being bound by default and logging below WARNING.
    import logging
    from types import SimpleNamespace

    from pynetdicom import _handlers

    source = inspect.getsource(_handlers)
    assert "LOGGER.warning" not in source and "LOGGER.error" not in source and "LOGGER.critical" not in source
    bound = {event: [(handler, None)] for event, handler in transport._STANDARD_LOGGING}
    unbound: list = []
    assoc = SimpleNamespace(get_handlers=lambda event: bound[event], unbind=lambda e, h: unbound.append(e))
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    try:
        logger.setLevel(logging.INFO)
        transport.skip_unlogged_messages(assoc)  # type: ignore[arg-type]
        assert unbound == []
        logger.setLevel(logging.WARNING)
        transport.skip_unlogged_messages(assoc)  # type: ignore[arg-type]
        assert unbound == [event for event, _ in transport._STANDARD_LOGGING]
    finally:
        logger.setLevel(level)
    defaults = inspect.getsource(Association._bind_defaults)
    assert all(handler.__name__ in defaults for _, handler in transport._STANDARD_LOGGING)


def test_store_response_command_is_what_pynetdicom_encodes() -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode
    from pynetdicom.sop_class import CTImageStorage

    for status, uids in ((0x0000, True), (0xA700, True), (0xB007, False), (0xC213, True)):
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo, rsp.Status = 65535 if uids else 1, status
        if uids:
            rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = CTImageStorage, "1.2.3.456"
        message = C_STORE_RSP()
        message.primitive_to_message(rsp)
        assert transport.store_response_command(rsp) == encode(message.command_set, True, True), status
        assert transport.p_data_stream(3, transport.store_response_command(rsp), None, 16384) == b"".join(
            transport.P_DATA_TF(p).encode() for p in message.encode_msg(3, 16384)
        )
    rsp.ErrorComment = "why"
    assert transport.store_response_command(rsp) is None  # pynetdicom encodes it
    # The C-STORE SCP answers through dimse.send_msg, which answer_stores_directly wraps.
    from pynetdicom.service_class import StorageServiceClass

    assert "self.dimse.send_msg(rsp, cx_id)" in inspect.getsource(StorageServiceClass.SCP)
