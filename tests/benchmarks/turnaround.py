"""Turnaround: seconds from the last slice of a 300-slice study to its SR stored in Orthanc.

The quiet period is excluded (it is a configuration choice, not work): the figure is the time from the
series' completion to the SR in Orthanc, broken down by pipeline stage, plus the delivery. Run:
``.venv/bin/python tests/benchmarks/turnaround.py [--slices 300] [--kind head-cta]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_config  # noqa: E402
from node.app import Node  # noqa: E402
from node.config import Destination  # noqa: E402
from peers import running_orthanc, wait_until  # noqa: E402
from simulator.studies import send_files, simulate_study, write_study  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--kind", default="head-cta")
    ap.add_argument("--condition", default="ge-revolution-standard")
    ap.add_argument("--quiet", type=float, default=2.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hn-turnaround-") as tmp:
        work = Path(tmp)
        study = simulate_study(args.kind, args.condition, seed=1, size="full", slices=args.slices)
        paths = [p for p in write_study(study, work / "study") if p.suffix == ".dcm"]
        with running_orthanc(work / "orthanc") as pacs:
            cfg = make_config(
                work / "node",
                pipeline={"quiet_seconds": args.quiet, "poll_seconds": 0.05},
                destinations=[Destination("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port)],
            )
            node = Node(cfg)
            node.start()
            try:
                t_send = time.time()
                send_files(paths, "127.0.0.1", node.port, cfg.node.ae_title)
                t_last = time.time()
                uid = study.truth["study_instance_uid"]

                def sr_in_pacs() -> bool:
                    found = pacs.post(
                        "/tools/find", {"Level": "Series", "Query": {"StudyInstanceUID": uid, "Modality": "SR"}}
                    )
                    return bool(found)

                wait_until(sr_in_pacs, timeout=600, interval=0.05, what="the SR in Orthanc")
                t_sr = time.time()
                row = node.index.series(study.truth["series_instance_uid"])
            finally:
                node.stop()
    timings = json.loads(row["timings"] or "{}")
    completed = row["completed_at"]
    result = {
        "slices": len(paths),
        "send_s": round(t_last - t_send, 2),
        "quiet_period_s": args.quiet,
        "turnaround_excluding_quiet_s": round(t_sr - completed, 2),
        "last_slice_to_sr_s": round(t_sr - t_last, 2),
        "stages_s": timings,
        "findings": len(json.loads(row["findings"] or "[]")),
        "model_version": row["model_version"],
        "rule": f"{row['rule_id']} ({row['rule_match']})",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
