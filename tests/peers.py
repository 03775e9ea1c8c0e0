"""Real peers for tests: DCMTK tools, Orthanc and dciodvfy, found on the system (never the venv's
pynetdicom scripts of the same names), and a rule: in CI (``CI=true``) a missing peer fails the test."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SYSTEM_BIN = ("/usr/bin", "/usr/local/bin", "/usr/sbin", "/bin")


def in_ci() -> bool:
    """True when running under CI, where no peer may be skipped."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def system_tool(name: str) -> str:
    """Absolute path of a system binary (DCMTK, Orthanc, dciodvfy); skip locally or fail in CI if missing."""
    for d in SYSTEM_BIN:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    found = shutil.which(name)
    if found and ".venv" not in found and "site-packages" not in found:
        return found
    msg = f"{name} not installed (apt-get install -y dcmtk orthanc dicom3tools, or run ./dev setup)"
    if in_ci():
        pytest.fail(msg)
    pytest.skip(msg)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_env() -> dict[str, str]:
    """Environment for DCMTK tools and Orthanc: Nagle off (a 40 ms stall per instance otherwise)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def run_tool(args: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a system tool; ``args[0]`` is its name."""
    cmd = [system_tool(args[0]), *args[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=peer_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):  # noqa: ANN001, ANN201
    """Poll ``predicate`` until it returns a truthy value or the deadline passes (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def dciodvfy_errors(path: str | Path) -> list[str]:
    """Error lines dciodvfy reports for a DICOM file (warnings are not errors)."""
    proc = run_tool(["dciodvfy", str(path)], check=False)
    out = proc.stdout + proc.stderr
    return [line for line in out.splitlines() if line.startswith("Error")]


def dcentvfy_report(paths: list[str] | list[Path]) -> tuple[list[str], list[str]]:
    """dcentvfy (dicom3tools) over instances together: its (errors, warnings) on entity consistency.

    It compares the attributes of each information entity (patient, study, series …) across the files.
    """
    proc = run_tool(["dcentvfy", *map(str, paths)], check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


def orthanc_plugin(name: str) -> str:
    """Path of an Orthanc plugin from Debian's packages (orthanc-dicomweb …); skip locally or fail in CI if missing."""
    path = ORTHANC_PLUGINS / name
    if path.is_file():
        return str(path)
    msg = f"Orthanc plugin {name} not installed (apt-get install -y orthanc-dicomweb, or run ./dev setup)"
    if in_ci():
        pytest.fail(msg)
    pytest.skip(msg)


class Orthanc:
    """A running Orthanc on free loopback ports with its own temp storage."""

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        modalities: dict[str, list] | None = None,
        count_receptions: bool = False,
        dicomweb: bool = False,
    ) -> None:
        self.workdir = workdir
        self.dicomweb = dicomweb
        self.aet = aet
        self.count_receptions = count_receptions
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self) -> Path:
        cfg = {
            "Name": "harmonode-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomModalities": self.modalities,
            "Plugins": [],
            "StableAge": 1,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
        }
        if self.dicomweb:
            # Debian's orthanc-dicomweb: QIDO-RS, WADO-RS and STOW-RS at /dicom-web/ on the HTTP port
            cfg["Plugins"] = [orthanc_plugin("libOrthancDicomWeb.so")]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full"}
        if self.count_receptions:
            # Orthanc keeps one copy of an instance stored twice; this logs every C-STORE it receives.
            lua = self.workdir / "receptions.lua"
            lua.write_text(
                "function ReceivedInstanceFilter(dicom, origin, info)\n"
                "  print('RECEIVED ' .. dicom.SOPInstanceUID)\n  return true\nend\n"
            )
            cfg["LuaScripts"] = [str(lua)]
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(cfg))
        return path

    def receptions(self) -> list[str]:
        """SOP Instance UIDs of every C-STORE received, duplicates included (``count_receptions=True``)."""
        self.log.flush()
        text = (self.workdir / "orthanc.log").read_text(errors="replace")
        return re.findall(r"RECEIVED (\S+)", text)

    def start(self) -> Orthanc:
        binary = system_tool("Orthanc")
        cfg = self.write_config()
        self.log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([binary, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT, env=peer_env())
        wait_until(self._up, timeout=60, what="Orthanc to answer on its HTTP port")
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str):  # noqa: ANN201
        with urllib.request.urlopen(self.url + path, timeout=10) as r:  # noqa: S310 - loopback only
            return json.loads(r.read())

    def post(self, path: str, body: object):  # noqa: ANN201
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - loopback only
            return json.loads(r.read() or b"null")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
            self.log.close()


@contextmanager
def running_orthanc(workdir: Path, **kwargs) -> Iterator[Orthanc]:  # noqa: ANN003
    """An Orthanc for the duration of a ``with`` block."""
    workdir.mkdir(parents=True, exist_ok=True)
    o = Orthanc(workdir, **kwargs).start()
    try:
        yield o
    finally:
        o.stop()


def listening_pids(log: Path, port: int, since: int = 0) -> set[int]:
    """Node processes serving ``port``, from their log: each says "listening as … (pid N)" once it serves."""
    text = log.read_bytes()[since:].decode(errors="replace") if log.exists() else ""
    return {int(p) for p in re.findall(rf"listening as \S+ on \S+:{port} \(pid (\d+)\)", text)}
