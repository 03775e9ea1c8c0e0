"""Every hop's audit message against the standard's own schema (PS3.15 A.5.1.1, RELAX NG, vendored in
tests/schemas/), the trail's hash chain across processes, and one push → analyse → deliver → C-FIND → C-GET
whose messages all validate, name the studies by UID, carry no patient identity, and whose chain a changed
line breaks."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from lxml import etree

from builders import make_ct_series
from conftest import make_config
from node.app import Node
from node.config import Destination
from peers import free_port, peer_env, run_tool, system_tool, wait_until
from storage.audit import (
    APPLICATION,
    DESTINATION_ROLE,
    INSTANCES_TRANSFERRED,
    LOGIN,
    QUERY,
    SOURCE_ROLE,
    USER_AUTHENTICATION,
    AuditTrail,
    Outcome,
    Participant,
    audit_message,
    query_object,
    read_messages,
    verify_chain,
)

SCHEMA = Path(__file__).parent / "schemas" / "audit-message.rnc"
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    """The A.5.1.1 schema. The standard writes ``##`` documentation comments after the patterns they
    describe, which the compact syntax only allows before one; as plain comments (``#``) they parse."""
    return etree.RelaxNG.from_rnc_string(SCHEMA.read_text(encoding="utf-8").replace("##", "#"))


def valid(schema: etree.RelaxNG, message: str) -> bool:
    ok = schema.validate(etree.fromstring(message.encode("utf-8")))
    if not ok:
        print(schema.error_log)  # the reason, shown with the failing assertion
    return ok


def test_the_node_s_messages_validate_and_the_schema_refuses_a_broken_one(schema: etree.RelaxNG) -> None:
    node = Participant("HARMONODE", False, role=DESTINATION_ROLE)
    transfer = audit_message(
        INSTANCES_TRANSFERRED,
        "C",
        Outcome.SUCCESS,
        [Participant("CT_ROOM1", True, "10.0.0.7", SOURCE_ROLE), node],
        "HARMONODE",
        studies=["1.2.3.4", "1.2.3.5"],
    )
    login = audit_message(
        USER_AUTHENTICATION, "E", Outcome.MINOR_FAILURE, [Participant("ada", True, "127.0.0.1")], "HARMONODE", LOGIN
    )
    query = audit_message(
        QUERY,
        "E",
        Outcome.SUCCESS,
        [Participant("VIEWER", True, "127.0.0.1"), Participant("HARMONODE", False, role=APPLICATION)],
        "HARMONODE",
        objects=[query_object("1.2.840.10008.5.1.4.1.2.2.1", "level=STUDY; keys=PatientName,StudyDate")],
        studies=["1.2.3.4"],
    )
    for message in (transfer, login, query):
        assert valid(schema, message)
    assert not valid(schema, transfer.replace('EventOutcomeIndicator="0"', 'EventOutcomeIndicator="3"'))
    source = ET.fromstring(transfer)
    source.remove(source.find("AuditSourceIdentification"))
    assert not valid(schema, ET.tostring(source, encoding="unicode"))
    with pytest.raises(ValueError, match="either a name or a query"):
        query_object("1.2.840.10008.5.1.4.1.2.2.1", "")


_APPENDER = """
import sys
from storage.audit import AuditTrail
trail = AuditTrail(sys.argv[1], "CLI")
for i in range(int(sys.argv[2])):
    trail.append(f"<AuditMessage n='{i}'/>")
"""


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    mine = AuditTrail(path, "HARMONODE")  # opened first: a trail that kept its place in memory breaks here
    mine.append("<AuditMessage first='1'/>")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    others = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), "60"], env=env, cwd=ROOT) for _ in range(2)]
    for i in range(60):
        mine.append(f"<AuditMessage mine='{i}'/>")
    assert all(p.wait(timeout=60) == 0 for p in others)
    mine.append("<AuditMessage last='1'/>")
    assert verify_chain(path) == 1 + 60 + 120 + 1
    seqs = [json.loads(line)["seq"] for line in path.read_text().splitlines()]
    assert seqs == list(range(1, len(seqs) + 1))


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp as the results' destination: its port and output folder."""
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    proc = subprocess.Popen(
        [system_tool("storescp"), "-aet", "PACS", "-od", str(out), str(port)],
        env=peer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    try:
        wait_until(listening, timeout=20, what="storescp to listen")
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _events(trail: Path) -> list[ET.Element]:
    return [ET.fromstring(m) for m in read_messages(trail)]


def _code(message: ET.Element) -> tuple[str, str]:
    ident = message.find("EventIdentification")
    return ident.find("EventID").get("csd-code"), ident.get("EventActionCode")


@pytest.mark.peers
def test_push_analyse_deliver_find_get_each_validate_and_a_changed_line_breaks_the_chain(
    tmp_path: Path, schema: etree.RelaxNG, storescp: tuple[int, Path]
) -> None:
    pacs_port, pacs_out = storescp
    datasets = make_ct_series(seed=13, slices=8)
    files = []
    for i, ds in enumerate(datasets):
        files.append(tmp_path / f"ct{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    study = str(datasets[0].StudyInstanceUID)
    config = make_config(
        tmp_path / "node", destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs_port)]
    )
    node = Node(config)
    node.start(("listen", "work", "dispatch"))
    try:
        trail = config.data_path / "audit" / "audit.log"
        port = str(node.port)
        run_tool(["storescu", "-aec", "HARMONODE", "-aet", "CT_ROOM1", "127.0.0.1", port, *map(str, files)])
        wait_until(
            lambda: (
                node.index.query("SELECT 1 FROM deliveries WHERE state='sent'")
                and not node.index.query("SELECT 1 FROM deliveries WHERE state NOT IN ('sent', 'dead')")
            ),
            timeout=180,
            interval=0.3,
            what="the series analysed and its results delivered",
        )
        sent = len(node.index.query("SELECT 1 FROM deliveries WHERE state='sent'"))
        wait_until(lambda: len(list(pacs_out.iterdir())) >= sent, timeout=30, what="storescp to hold the results")
        run_tool(
            ["findscu", "-S", "-aec", "HARMONODE", "-aet", "VIEWER", "-k", "QueryRetrieveLevel=STUDY",
             "-k", "PatientName=Test*", "-k", "StudyInstanceUID", "127.0.0.1", port]
        )  # fmt: skip
        got = tmp_path / "got"
        got.mkdir()
        run_tool(
            ["getscu", "-aec", "HARMONODE", "-aet", "VIEWER", "-S", "-od", str(got),
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", port],
            timeout=60,
        )  # fmt: skip
        wait_until(lambda: len(_events(trail)) >= 4 + sent, timeout=20, what="every hop audited")
    finally:
        node.stop()

    messages = read_messages(trail)
    assert messages and all(valid(schema, m) for m in messages)
    parsed = [ET.fromstring(m) for m in messages]
    codes = [_code(m) for m in parsed]
    received = parsed[codes.index(("110104", "C"))]
    assert {p.get("UserID") for p in received.findall("ActiveParticipant")} == {"CT_ROOM1", "HARMONODE"}
    analysed = parsed[codes.index(("110103", "C"))]
    assert [o.get("ParticipantObjectID") for o in analysed.findall("ParticipantObjectIdentification")] == [study]
    transfers = [m for m, c in zip(parsed, codes, strict=True) if c == ("110104", "R")]
    to_pacs = [m for m in transfers if "PACS" in {p.get("UserID") for p in m.findall("ActiveParticipant")}]
    assert len(to_pacs) == sent  # one message per result object delivered
    query = parsed[codes.index(("110112", "E"))]
    objects = query.findall("ParticipantObjectIdentification")
    assert objects[0].find("ParticipantObjectIDTypeCode").get("csd-code") == "110181"
    assert study in [o.get("ParticipantObjectID") for o in objects[1:]]
    to_viewer = [m for m in transfers if "VIEWER" in {p.get("UserID") for p in m.findall("ActiveParticipant")}]
    assert len(to_viewer) == 1
    roles = {p.get("UserID"): p.find("RoleIDCode").get("csd-code") for p in to_viewer[0].findall("ActiveParticipant")}
    assert roles == {"VIEWER": "110152", "HARMONODE": "110153"}  # the caller received, the node sent
    assert len(list(got.iterdir())) > len(files)  # the study as it is now: the CT and the node's results
    text = trail.read_text()
    assert "Test^Patient" not in text and str(datasets[0].PatientID) not in text
    asked = base64.b64decode(objects[0].find("ParticipantObjectQuery").text).decode()
    assert asked.startswith("level=STUDY; keys=") and "PatientName" in asked and "Test" not in asked
    assert verify_chain(trail) == len(messages)
    lines = text.splitlines()
    record = json.loads(lines[2])
    record["message"] = record["message"].replace(study, "1.2.3.999")
    lines[2] = json.dumps(record)
    trail.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 3"):
        verify_chain(trail)


def _write_config(root: Path, syslog_port: int) -> Path:
    path = root / "node.toml"
    path.write_text(
        f'[node]\ndata_dir = "{root / "node"}"\n\n[storage]\naudit_syslog = "udp://127.0.0.1:{syslog_port}"\n'
    )
    return path


def test_command_line_changes_are_audited_and_every_message_is_copied_to_syslog(
    schema: etree.RelaxNG, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from node.cli import app as cli
    from rules.keys import ConditionKey
    from rules.registry import RuleRegistry
    from storage.store import open_store

    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a real syslog collector's socket (UDP)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(10)
    config = _write_config(tmp_path, collector.getsockname()[1])
    with open_store(tmp_path / "node") as store:
        key = ConditionKey.parse("CT|ge|optima-ct660|bone|ctdi5-15|100kv|head")
        rule = RuleRegistry(store.index.db, store.index.lock).add(key, "seed", {"a": 1.0, "b": 0.0, "c": 300.0})
    runner = CliRunner()
    for args in (["rules", "activate", rule.label], ["models", "activate", "shipped"]):
        result = runner.invoke(cli, [*args, "--config", str(config)])
        assert result.exit_code == 0, result.output
    trail = tmp_path / "node" / "audit" / "audit.log"
    messages = read_messages(trail)
    assert len(messages) == 2 and verify_chain(trail) == 2
    for message in messages:
        assert valid(schema, message)
        assert 'csd-code="110131"' in message  # Security Alert of type Software Configuration
    datagrams = [collector.recv(70000) for _ in messages]
    collector.close()
    for datagram, message in zip(datagrams, messages, strict=True):
        head, _, body = datagram.partition(b"\xef\xbb\xbf")
        fields = head.decode("ascii").split(" ")
        assert fields[0] == "<85>1" and fields[5] == "IHE+RFC-3881" and fields[6] == "-"  # facility 10, notice
        assert body.decode("utf-8") == message


def test_a_bad_syslog_target_is_a_config_error(tmp_path: Path) -> None:
    from node.config import ConfigError, load_config

    path = tmp_path / "node.toml"
    path.write_text('[storage]\naudit_syslog = "tcp://collector:601"\n')
    with pytest.raises(ConfigError, match="udp://HOST"):
        load_config(path)
