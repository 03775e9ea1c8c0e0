"""Who may use which DICOM service: per-peer permissions, as Orthanc's modalities have them.

With no peer listed the node is open to every caller the allow-lists admit (the embedded default, for one
machine). Once peers are listed, an association is accepted only from a listed AE title (and, where the
peer names its addresses, only from one of them), and each service checks the caller's permission: a
scanner may store, a PACS may query and retrieve, a viewer may C-GET, and a C-MOVE may only name a
destination among the configured ones that the caller may send to. A refusal is the status
``NOT_AUTHORIZED`` (0x0124, PS3.7 C.5) and a log line with the AE title and the service; a C-MOVE the
caller may not make is answered 0xA801 (move destination unknown), since pynetdicom takes the destination
before anything else and would associate with it before a failure status.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from pynetdicom import evt

log = logging.getLogger(__name__)

NOT_AUTHORIZED = 0x0124


class Service(StrEnum):
    """The DIMSE services a peer may be allowed to use."""

    ECHO = "echo"
    STORE = "store"
    FIND = "find"
    GET = "get"
    MOVE = "move"
    COMMITMENT = "commitment"  # storage commitment (N-ACTION requests and N-EVENT-REPORTs)


@dataclass(frozen=True)
class PeerPermission:
    """What one calling AE may do, and from where."""

    ae_title: str
    services: frozenset[Service] = frozenset({Service.ECHO})
    addresses: tuple[str, ...] = ()  # empty: any address
    move_destinations: tuple[str, ...] = ()  # AE titles it may C-MOVE to; empty: every configured destination
    port: int = 0  # where it listens (storage commitment reports on a new association); 0: not known

    @classmethod
    def of(
        cls,
        ae_title: str,
        services: Iterable[str],
        addresses: Iterable[str] = (),
        move_destinations: Iterable[str] = (),
        port: int = 0,
    ) -> PeerPermission:
        """Build from plain strings (config), refusing an unknown service name.

        Raises
        ------
        ValueError
            A service that is not one of echo, store, find, get, move, commitment; a port out of 0..65535.
        """
        try:
            granted = frozenset(Service(s.strip().lower()) for s in services)
        except ValueError as exc:
            known = ", ".join(s.value for s in Service)
            raise ValueError(f"peer {ae_title!r}: unknown service in {list(services)!r}; known: {known}") from exc
        if not 0 <= int(port) < 65536:
            raise ValueError(f"peer {ae_title!r}: port {port} is not in 1..65535")
        return cls(ae_title.strip(), granted, tuple(addresses), tuple(move_destinations), int(port))


@dataclass(frozen=True)
class Permissions:
    """Every listed peer's permissions; ``open`` when none is listed."""

    peers: Sequence[PeerPermission] = field(default_factory=tuple)

    @property
    def open(self) -> bool:
        """True when no peer is listed: every admitted caller may use every service."""
        return not self.peers

    def _peer(self, ae_title: str, address: str) -> PeerPermission | None:
        ae = ae_title.strip()
        for peer in self.peers:
            if peer.ae_title == ae and (not peer.addresses or address in peer.addresses):
                return peer
        return None

    def allows(self, ae_title: str, address: str, service: Service) -> bool:
        """Whether the caller ``ae_title`` at ``address`` may use ``service``."""
        if self.open:
            return True
        peer = self._peer(ae_title, address)
        return peer is not None and service in peer.services

    def may_move_to(self, ae_title: str, address: str, destination_ae: str) -> bool:
        """Whether the caller may C-MOVE to ``destination_ae`` (a configured destination, checked apart)."""
        if self.open:
            return True
        peer = self._peer(ae_title, address)
        if peer is None or Service.MOVE not in peer.services:
            return False
        return not peer.move_destinations or destination_ae.strip() in peer.move_destinations

    def check(self, event: evt.Event, service: Service) -> bool:
        """``allows`` for the caller of ``event``, with the log line of a refusal."""
        requestor = event.assoc.requestor
        if self.allows(requestor.ae_title, requestor.address, service):
            return True
        log.warning("%s from %s at %s refused: not authorized", service, requestor.ae_title, requestor.address)
        return False

    def admit(self, event: evt.Event) -> None:
        """EVT_REQUESTED handler: with peers listed, reject a calling AE that is not one of them (or calls
        from an address its entry does not name): rejected-permanent, calling AE title not recognized."""
        if self.open:
            return
        requestor = event.assoc.requestor
        ae = requestor.primitive.calling_ae_title if requestor.primitive else ""
        if self._peer(str(ae), requestor.address) is None:
            log.warning("association from %s at %s rejected: not a listed peer", ae, requestor.address)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
