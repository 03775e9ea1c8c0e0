"""C-ECHO SCP: the verification service."""

from __future__ import annotations

import logging

from pynetdicom import evt

log = logging.getLogger(__name__)


def handle_echo(event: evt.Event) -> int:
    """EVT_C_ECHO handler: always success while the node is serving."""
    log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
    return 0x0000
