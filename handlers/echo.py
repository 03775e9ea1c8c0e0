"""C-ECHO SCP: the verification service."""

from __future__ import annotations

import logging

from pynetdicom import evt

from handlers.permissions import NOT_AUTHORIZED, Permissions, Service

log = logging.getLogger(__name__)


def handle_echo(event: evt.Event, permissions: Permissions | None = None) -> int:
    """EVT_C_ECHO handler: success while the node is serving, to a caller allowed to echo."""
    if permissions is not None and not permissions.check(event, Service.ECHO):
        return NOT_AUTHORIZED
    log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return 0x0000
