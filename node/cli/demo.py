"""``harmonode demo``: a node, a local PACS and a synthetic scanner, on embedded defaults.

The scanner (``simulator.studies``) pushes a few studies under different imaging conditions to the node over
C-STORE; the node completes each series, harmonizes it, runs the detector and sends SR, key images and
GSPS to the PACS. The demo prints, per study: condition, key, rule, findings against the ground truth,
what arrived in the PACS, and the turnaround from the last slice to the results in the PACS.

The PACS is Orthanc when it is installed (``./dev demo`` installs it), otherwise a minimal storage SCP
run by the demo itself, so the demo also works where no system package can be installed.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from models.training.hits import count_hits
from node.config import Config, Destination, load_config, with_overrides

if TYPE_CHECKING:
    from node.app import Node

log = logging.getLogger(__name__)

DEMO_PLAN = [  # (kind, condition): the detector's two tasks under conditions that need a rule
    ("head-cta", "siemens-force-br40"),
    ("head-mra", "ge-signa-1.5t-tof"),
    ("head-cta", "philips-ict-b-lowdose"),
    ("chest-ct", "canon-aquilion-fc43"),
    ("head-cta", "siemens-definition-hr64"),
    ("head-mra", "philips-ingenia-3t-tof"),
]
#: The reference condition per kind: the rules make every other condition look like it.
DEMO_REFERENCE = {
    "head-cta": "ge-revolution-standard",
    "head-mra": "siemens-skyra-3t-tof",
    "chest-ct": "ge-revolution-standard",
}
#: The simulated size the demo scans at: the one the detector's thresholds were calibrated on.
DEMO_SIZE = "eval"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PacsArrival:
    """What the PACS holds of one study: modality → (instances, time the last one arrived, if known)."""

    by_modality: dict[str, tuple[int, float]] = field(default_factory=dict)


class BuiltinPacs:
    """A minimal C-STORE SCP that remembers what arrived (used when Orthanc is not installed)."""

    name = "built-in storage SCP"
    aet = "DEMOPACS"

    def __init__(self) -> None:
        self.port = _free_port()
        self.arrivals: dict[str, dict[str, list[float]]] = {}
        self.lock = threading.Lock()
        ae = AE(ae_title=self.aet)
        ae.maximum_pdu_size = 0
        from handlers.store import STORAGE_SOP_CLASSES

        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        with self.lock:
            study = self.arrivals.setdefault(str(ds.StudyInstanceUID), {})
            study.setdefault(str(ds.Modality), []).append(time.time())
        return 0x0000

    def study(self, study_uid: str) -> PacsArrival:
        with self.lock:
            got = self.arrivals.get(study_uid, {})
            return PacsArrival({m: (len(t), max(t)) for m, t in got.items()})

    def stop(self) -> None:
        self.server.shutdown()


class OrthancPacs:
    """Orthanc on free loopback ports with a throw-away storage folder."""

    name = "Orthanc"
    aet = "ORTHANC"

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = _free_port()
        self.http = _free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "orthanc.json"
        cfg.write_text(
            json.dumps(
                {
                    "Name": "harmonode-demo-pacs",
                    "StorageDirectory": str(workdir / "db"),
                    "IndexDirectory": str(workdir / "db"),
                    "DicomAet": self.aet,
                    "DicomPort": self.port,
                    "HttpPort": self.http,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "Plugins": [],
                }
            )
        )
        self.log = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, str(cfg)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("Orthanc exited at start; see its log in the demo folder")
            try:
                self._get("/system")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer within 30 s")

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=5) as r:  # noqa: S310
            return json.loads(r.read())

    def _post(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
            return json.loads(r.read())

    def study(self, study_uid: str) -> PacsArrival:
        out = PacsArrival()
        ids = self._post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        for sid in ids:
            for series in self._get(f"/studies/{sid}/series"):
                mod = series["MainDicomTags"].get("Modality", "?")
                prev = out.by_modality.get(mod, (0, 0.0))
                out.by_modality[mod] = (prev[0] + len(series["Instances"]), 0.0)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def start_pacs(workdir: Path) -> BuiltinPacs | OrthancPacs:
    """Orthanc when installed, else the built-in storage SCP."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if binary:
        try:
            return OrthancPacs(binary, workdir / "orthanc")
        except (RuntimeError, OSError) as exc:
            log.warning("Orthanc could not start (%s); using the built-in storage SCP", exc)
    return BuiltinPacs()


def _count_hits(findings: list[dict[str, Any]], lesions: list[dict[str, Any]]) -> tuple[int, int]:
    """(true positives, false positives) of a series' findings against its true lesions, by the project's
    one hit rule (``models.training.hits.PRIMARY``, the sac-tight count ``harmonode evaluate`` counts by)."""
    centres = [les["center_mm"] for les in lesions]
    return count_hits([f["center_mm"] for f in findings], centres, [les["diameter_mm"] for les in lesions])


def fit_demo_rules(plan: list[tuple[str, str]], work: Path, data: Path, seed: int) -> list[str]:
    """Fit the rules the demo's studies need, as a site would: unlabeled studies → ``harmonode rules fit``.

    Two unlabeled studies of every condition in ``plan`` and four of each kind's reference condition are
    simulated (seeds disjoint from the demo's studies) into ``work/unlabeled`` and fitted into the node's
    index at ``data`` with ``harmonode rules fit --from-dir … --activate``. Returns the command's lines.
    """
    import os
    import sys

    from simulator.studies import simulate_study, write_study

    folder = work / "unlabeled"
    wanted: dict[tuple[str, str], int] = {}
    for kind, condition in plan:
        wanted[(kind, DEMO_REFERENCE[kind])] = 4
        wanted.setdefault((kind, condition), 2)
    n = 0
    for (kind, condition), count in wanted.items():
        for _ in range(count):
            n += 1
            write_study(simulate_study(kind, condition, seed=seed + 10_000 + n, size=DEMO_SIZE), folder / f"s{n}")
    for path in folder.rglob("*.json"):  # ground truth stays out: rules are fitted from images only
        path.unlink()
    env = {**os.environ, "HARMONODE_NODE_DATA_DIR": str(data)}
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "rules", "fit", "--from-dir", str(folder), "--activate"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"rules fit failed: {proc.stderr.strip()[-500:]}")
    shutil.rmtree(folder, ignore_errors=True)
    return [f"{n} unlabeled studies → harmonode rules fit --from-dir … --activate"] + [
        line for line in proc.stdout.splitlines() if line.strip()
    ]


def _demo_config(data: Path, pacs: BuiltinPacs | OrthancPacs) -> Config:
    """Embedded defaults on a free port with a short quiet period and fast retries, results to ``pacs``."""
    return with_overrides(
        load_config(None),
        node={"port": _free_port(), "data_dir": str(data)},
        pipeline={"quiet_seconds": 2.0, "poll_seconds": 0.2},
        queue={"backoff_base_s": 0.5, "backoff_max_s": 5.0},
        destinations=[Destination("pacs", pacs.aet, "127.0.0.1", pacs.port)],
    )


def _send_studies(plan: list[tuple[str, str]], work: Path, node: Node, seed: int) -> list[dict[str, Any]]:
    """Simulate and push one study per ``plan`` entry to the node; what was sent, with its ground truth."""
    from simulator.studies import send_files, simulate_study, write_study

    sent: list[dict[str, Any]] = []
    for i, (kind, condition) in enumerate(plan):
        study = simulate_study(kind, condition, seed=seed + i, size=DEMO_SIZE)
        paths = write_study(study, work / f"study{i}")
        n = send_files([p for p in paths if p.suffix == ".dcm"], "127.0.0.1", node.port, node.config.node.ae_title)
        sent.append({"kind": kind, "condition": condition, "truth": study.truth, "n": n, "sent_at": time.time()})
        typer.echo(f"scanner: sent study {i + 1}/{len(plan)} ({kind}, {condition}, {n} slices)")
    return sent


def _wait_for_results(
    node: Node, pacs: BuiltinPacs | OrthancPacs, sent: list[dict[str, Any]], timeout_s: float
) -> None:
    """Poll the PACS until every sent study has an SR there and the queue is empty, or ``timeout_s`` passes.

    Each study that got its SR is given ``sr_seen_at`` (epoch seconds).
    """
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        arrivals = [pacs.study(s["truth"]["study_instance_uid"]) for s in sent]
        for s, a in zip(sent, arrivals, strict=True):
            if "SR" in a.by_modality and "sr_seen_at" not in s:
                s["sr_seen_at"] = time.time()
        if all("sr_seen_at" in s for s in sent) and node.queue.pending_count() == 0:
            return
        time.sleep(0.25)


def run_demo(studies: int = 3, seed: int = 7, data_dir: Path | None = None, timeout_s: float = 600) -> int:
    """Run the demo; return a process exit code (0: every study made it to the PACS).

    Raises
    ------
    RuntimeError
        The rules could not be fitted or the PACS did not start.
    OSError
        The node could not start.
    """
    from node.app import Node

    work = Path(tempfile.mkdtemp(prefix="harmonode-demo-"))
    data = Path(data_dir) if data_dir else work / "node"
    pacs = start_pacs(work)
    try:
        plan = [DEMO_PLAN[i % len(DEMO_PLAN)] for i in range(studies)]
        typer.echo("fitting the conversion rules from unlabeled studies (seed 000) ...")
        for line in fit_demo_rules(plan, work, data, seed):
            typer.echo(f"  {line}")
        cfg = _demo_config(data, pacs)
        node = Node(cfg)
        node.start()
        try:
            typer.echo(
                f"node {cfg.node.ae_title} on 127.0.0.1:{node.port}, data in {data}; PACS: {pacs.name} "
                f"({pacs.aet} on 127.0.0.1:{pacs.port})"
            )
            sent = _send_studies(plan, work, node, seed)
            typer.echo("waiting for series completion, analysis and delivery ...")
            _wait_for_results(node, pacs, sent, timeout_s)
            code = _print_table(node, pacs, sent)
        finally:
            node.stop()
    finally:
        pacs.stop()
    if not data_dir:
        shutil.rmtree(work, ignore_errors=True)
    return code


def _print_table(node: Node, pacs: BuiltinPacs | OrthancPacs, sent: list[dict[str, Any]]) -> int:
    """The per-study table; 0 when every study's SR reached the PACS, else 1."""
    index = node.index
    code = 0
    typer.echo("")
    header = (
        f"{'#':<2} {'kind':<9} {'condition':<24} {'rule':<26} {'findings':<9} {'truth':<6} {'TP/FP':<6} "
        f"{'in PACS':<22} {'turnaround':>10}"
    )
    typer.echo(header)
    typer.echo("-" * len(header))
    for i, s in enumerate(sent):
        t = s["truth"]
        row = index.series(t["series_instance_uid"]) or {}
        findings = json.loads(row.get("findings") or "[]")
        tp, fp = _count_hits(findings, t.get("lesions", []))
        arrival = pacs.study(t["study_instance_uid"])
        in_pacs = " ".join(f"{m}:{n}" for m, (n, _) in sorted(arrival.by_modality.items()) if m not in ("CT", "MR"))
        turnaround = s["sr_seen_at"] - s["sent_at"] if "sr_seen_at" in s else None
        if turnaround is None:
            code = 1
        rule = f"{row.get('rule_id') or '-'} ({row.get('rule_match') or '-'})"
        typer.echo(
            f"{i + 1:<2} {s['kind']:<9} {s['condition']:<24} {rule[:26]:<26} {len(findings):<9} "
            f"{len(t.get('lesions', [])):<6} {tp}/{fp:<4} {in_pacs or 'nothing yet':<22} "
            f"{f'{turnaround:.1f} s' if turnaround is not None else '-':>10}"
        )
        if row.get("error"):
            typer.echo(f"   {row['error']}")
        if row.get("condition_key"):
            typer.echo(f"   condition key: {row['condition_key']}")
    typer.echo("")
    typer.echo("turnaround: last slice sent → SR stored in the PACS (includes the 2 s quiet period)")
    return code
