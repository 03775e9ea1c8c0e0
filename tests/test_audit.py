"""The audit trail after a real push and console use: A.5 AuditMessages with their required parts, no
patient identity, and a hash chain that a changed line breaks."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree as ET

import httpx  # noqa: I001
import pytest

from builders import make_ct_series
from peers import run_tool, wait_until
from storage.audit import read_messages, verify_chain
from webnode import csrf_of, logged_in, login, web_node


def check_a5(xml: str) -> ET.Element:
    """The required structure of PS3.15 A.5.1's AuditMessage (the schema's mandatory elements/attributes)."""
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    ident = root.find("EventIdentification")
    assert ident is not None
    assert ident.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert ident.get("EventDateTime") and ident.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    event_id = ident.find("EventID")
    assert event_id is not None and event_id.get("csd-code") and event_id.get("codeSystemName")
    participants = root.findall("ActiveParticipant")
    assert participants and all(p.get("UserID") and p.get("UserIsRequestor") in {"true", "false"} for p in participants)
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID")
    for obj in root.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID")
        id_type = obj.find("ParticipantObjectIDTypeCode")
        assert id_type is not None and id_type.get("csd-code")
    # the schema's order: EventIdentification, ActiveParticipant+, AuditSourceIdentification, objects
    order = [child.tag for child in root]
    assert order[0] == "EventIdentification" and order.index("AuditSourceIdentification") > order.index(
        "ActiveParticipant"
    )
    return root


@pytest.mark.peers
def test_push_login_and_resend_are_audited_and_the_chain_detects_a_change(tmp_path: Path) -> None:
    datasets = make_ct_series(seed=11, slices=3)
    files = []
    for i, ds in enumerate(datasets):
        files.append(tmp_path / f"ct{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    with web_node(tmp_path / "node") as node:
        trail = node.config.data_path / "audit" / "audit.log"
        run_tool(["storescu", "-aec", "HARMONODE", "-aet", "CT_ROOM1", "127.0.0.1", str(node.port), *map(str, files)])
        wait_until(lambda: trail.exists() and read_messages(trail), timeout=10, what="the transfer audited")
        client = httpx.Client(base_url=f"http://127.0.0.1:{node.web.port}", headers={"accept": "text/html"})
        assert login(client, "vic", "wrong-password").status_code == 401
        admin = logged_in(node, "ada")
        token = csrf_of(admin.get("/deliveries").text)
        assert admin.post("/deliveries/resend", data={"destination": "", "csrf_token": token}).status_code == 303
        messages = [check_a5(m) for m in read_messages(trail)]
    events = [
        (
            m.find("EventIdentification/EventID").get("csd-code"),
            m.find("EventIdentification").get("EventOutcomeIndicator"),
        )
        for m in messages
    ]
    assert events == [("110104", "0"), ("110114", "4"), ("110114", "0"), ("110100", "0")]
    transfer = messages[0]
    assert transfer.find("EventIdentification").get("EventActionCode") == "C"
    assert [o.get("ParticipantObjectID") for o in transfer.findall("ParticipantObjectIdentification")] == [
        datasets[0].StudyInstanceUID
    ]
    assert {p.get("UserID") for p in transfer.findall("ActiveParticipant")} == {"CT_ROOM1", "HARMONODE"}
    text = trail.read_text()
    assert "Test^Patient" not in text and datasets[0].PatientID not in text and "ACC1" not in text
    assert verify_chain(trail) == 4
    lines = trail.read_text().splitlines()
    record = json.loads(lines[1])
    record["message"] = record["message"].replace('EventOutcomeIndicator="4"', 'EventOutcomeIndicator="0"')
    lines[1] = json.dumps(record)
    trail.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        verify_chain(trail)
