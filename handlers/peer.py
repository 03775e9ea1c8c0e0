"""A DICOM peer the node talks to as SCU, and the one way the node opens an association with it.

``Peer`` is the value every client-side handler is given (send, pull, the C-MOVE destination): never the
node or its config. ``associate`` proposes the given contexts and turns Nagle off on the new socket, once,
through the same ``EVT_CONN_OPEN`` handler the node's own SCP uses (``handlers.transport.tune_socket``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from handlers.transport import tune_socket


def check_ae_title(value: str, what: str) -> None:
    """Refuse an AE title DICOM does not allow (1-16 printable characters, no backslash).

    Raises
    ------
    ValueError
        With a message naming ``what``.
    """
    if not value or len(value) > 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"{what}: {value!r} is not a valid AE title (1-16 printable characters, no '\\')")


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity reachable over the network."""

    name: str
    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title, f"peer {self.name!r} ae_title")
        if not 0 < int(self.port) < 65536:
            raise ValueError(f"peer {self.name!r}: port {self.port} is not in 1..65535")

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def associate(
    peer: Peer,
    calling_ae: str,
    contexts: Sequence[PresentationContext] | None = None,
    timeout: float = 30.0,
    **kwargs: Any,
) -> Association:
    """Open an association with ``peer`` (check ``is_established`` on the result).

    Parameters
    ----------
    peer
        Who to call.
    calling_ae
        The node's own AE title.
    contexts
        The presentation contexts to propose (add more to the returned association's AE beforehand by
        passing ``ext_neg`` etc. through ``kwargs``).
    timeout
        ACSE, DIMSE and network timeout in seconds.
    kwargs
        Passed to ``AE.associate`` (``ext_neg``, ...).
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.requested_contexts = list(contexts or [])
    return ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, tune_socket)], **kwargs
    )
