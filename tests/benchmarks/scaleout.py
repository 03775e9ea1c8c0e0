"""Scale-out benchmark: studies per minute of the embedded node, and of the cluster with 1 and with 2 workers.

The same N small head CTAs (``--studies``, default 12) are pushed by DCMTK storescu to
(a) ``harmonode serve`` on SQLite and a folder (the embedded default, one pipeline thread),
(b) the cluster (PostgreSQL, RabbitMQ, Orthanc as the PACS): ``listen`` + 1 ``work`` + ``dispatch``,
(c) the same with 2 ``work`` processes.
Each run is timed from the first byte pushed until every series is analysed and every result is in Orthanc.
Prints studies/min of each, the ratios c/b and b/a, and the per-study costs the README's plan for
10,000 studies a day is computed from (the pipeline's stage timings, medians over the studies).
``--threads N`` sets OMP_NUM_THREADS (torch's threads) in every node process: on a host whose cores the workers
share, one thread per worker keeps two workers from fighting over the same cores.
Run: ``.venv/bin/python tests/benchmarks/scaleout.py [--studies 12] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from clusternode import Processes, echo, push, running_cluster, settled, studies  # noqa: E402
from peers import free_port, running_orthanc, wait_until  # noqa: E402
from pg import scratch_database  # noqa: E402
from rabbit import broker_or_start  # noqa: E402
from storage.store import open_store  # noqa: E402


def embedded(root: Path, folder: Path, n: int, orthanc_port: int, env: dict) -> tuple[float, list[dict]]:
    """Seconds for the embedded node to analyse and deliver ``n`` studies; the series' stage timings."""
    port = free_port()
    config = root / "embedded.toml"
    config.write_text(
        f'[node]\nport = {port}\ndata_dir = "{root / "embedded"}"\n[pipeline]\nquiet_seconds = 1.0\n'
        f'poll_seconds = 0.1\n[web]\nenabled = false\n[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\n'
        f'host = "127.0.0.1"\nport = {orthanc_port}\n'
    )
    procs = Processes(root, config, env)
    procs.start("embedded", "serve")
    try:
        wait_until(lambda: echo(port), timeout=60, interval=0.2, what="the embedded node")
        t0 = time.monotonic()
        push(port, folder)
        with open_store(root / "embedded") as store:
            wait_until(lambda: settled(store, n), timeout=1800, interval=0.5, what="the embedded run")
            elapsed = time.monotonic() - t0
            return elapsed, timings(store)
    finally:
        procs.stop_all()


def cluster(
    root: Path, folder: Path, n: int, workers: int, broker: str, orthanc_port: int, env: dict
) -> tuple[float, list]:
    """Seconds for the cluster with ``workers`` work processes to analyse and deliver ``n`` studies."""
    with scratch_database() as database, running_cluster(root, broker, database, orthanc_port, workers, env) as c:
        time.sleep(8)  # the workers connect to the broker (the embedded node is timed warm too)
        t0 = time.monotonic()
        push(c.port, folder)
        wait_until(lambda: settled(c.store, n), timeout=1800, interval=0.5, what=f"the {workers}-worker run")
        return time.monotonic() - t0, timings(c.store)


def timings(store) -> list[dict]:  # noqa: ANN001
    """The stage timings of every analysed series."""
    rows = store.index.query("SELECT timings FROM series WHERE origin='received' AND state='done'")
    return [json.loads(r["timings"] or "{}") for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the node's processes (0: unset)")
    args = parser.parse_args()
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    n = args.studies
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, folder = studies(root, n, first_seed=900)
        broker, own = broker_or_start(root / "rabbit")
        try:
            rates, stage_costs = {}, []
            with running_orthanc(root / "orthanc-a") as orthanc:
                seconds, costs = embedded(root, folder, n, orthanc.dicom_port, env)
                rates["embedded"] = n / seconds * 60
                stage_costs += costs
            for workers in (1, 2):
                with running_orthanc(root / f"orthanc-{workers}") as orthanc:
                    seconds, costs = cluster(root / f"c{workers}", folder, n, workers, broker, orthanc.dicom_port, env)
                    rates[f"cluster, {workers} worker(s)"] = n / seconds * 60
                    stage_costs += costs
        finally:
            if own is not None:
                own.stop()
    for name, rate in rates.items():
        print(f"{name:<22} {rate:6.1f} studies/min")
    print(f"2 workers / 1 worker: {rates['cluster, 2 worker(s)'] / rates['cluster, 1 worker(s)']:.2f}x")
    print(f"cluster 1 worker / embedded: {rates['cluster, 1 worker(s)'] / rates['embedded']:.2f}x")
    stages = sorted({k for c in stage_costs for k in c})
    medians = {s: statistics.median(c.get(s, 0.0) for c in stage_costs) for s in stages}
    print("per-study stage cost (median s): " + ", ".join(f"{s} {v:.3f}" for s, v in medians.items()))
    print(f"per-study pipeline total (median): {sum(medians.values()):.2f} s")


if __name__ == "__main__":
    main()
