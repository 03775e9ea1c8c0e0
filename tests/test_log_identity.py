"""No patient identity in the node's log, at any level: a node run with --verbose, scanned after real traffic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from builders import SeriesSpec, findscu, store_population
from peers import free_port, peer_env, run_tool, system_tool, wait_until

pytestmark = pytest.mark.peers

NAME, PATIENT_ID, ACCESSION = "SECRETNAME^ZELDA", "PID-SECRET-4711", "ACCSECRET9"


def test_verbose_log_carries_no_patient_identity(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nport = {port}\ndata_dir = "{tmp_path / "data"}"\n[pipeline]\nquiet_seconds = 3600\n')
    log_path = tmp_path / "node.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--verbose", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
        )
        try:
            echo = [system_tool("echoscu"), "-aec", "HARMONODE", "127.0.0.1", str(port)]
            wait_until(lambda: subprocess.run(echo, capture_output=True, env=peer_env()).returncode == 0, timeout=60)
            study = generate_uid()
            spec = SeriesSpec(PATIENT_ID, NAME, study, "20240101", "120000", ACCESSION, generate_uid(), "CT", 2)
            store_population(port, [spec])
            keys = ["QueryRetrieveLevel=STUDY", "PatientName=SECRETNAME*", "PatientID", "AccessionNumber"]
            rsps = findscu(port, tmp_path / "find", [*keys, "StudyInstanceUID"])
            assert [r.PatientID for r in rsps] == [PATIENT_ID]  # the traffic really carried the identity
            (tmp_path / "get").mkdir()
            get = ["getscu", "-aec", "HARMONODE", "-S", "-od", str(tmp_path / "get"), "-k", "QueryRetrieveLevel=STUDY"]
            run_tool([*get, "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port)])
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    text = log_path.read_text(errors="replace")
    assert "DEBUG" in text and len(text.splitlines()) > 20  # the verbose log was written
    for secret in (NAME, "SECRETNAME", "ZELDA", PATIENT_ID, ACCESSION):
        assert secret not in text, f"{secret} in the log"
