"""``harmonode status``: studies, series and jobs, as JSON for scripts or as a table for people.

The report itself is read by ``storage.status.collect_status``; this module only formats it.
"""

from __future__ import annotations

from typing import Any


def format_status(report: dict[str, Any]) -> str:
    """A human-readable summary of ``storage.status.collect_status``'s report."""
    lines = [
        f"node {report['node']['ae_title']} at {report['node']['host']}:{report['node']['port']}"
        f"  data {report['node']['data_dir']}",
        "  ".join(f"{k}: {v}" for k, v in report["counts"].items()) + f"  quarantined: {report['quarantined']}",
        "",
    ]
    for study in report["studies"]:
        lines.append(f"study {study['study_instance_uid']}  {study['study_date']}  {study['modalities']}")
        for s in study["series"]:
            findings = s["findings"] if isinstance(s["findings"], list) else []
            lines.append(
                f"  series {s['series_instance_uid']}  {s['modality']:<3} {s['origin']:<8} {s['state']:<10}"
                f" {s['instance_count']:>4} inst  key={s['condition_key'] or '-'}  rule={s['rule'] or '-'}"
                f"  findings={len(findings)}" + (f"  error={s['error']}" if s["error"] else "")
            )
    findings = report.get("findings", [])
    if findings:
        lines += ["", f"findings ({len(findings)}; `harmonode feedback FINDING_ID …` assesses one):"]
        for f in findings[:200]:
            lines.append(
                f"  {f['finding_id']}  {f['kind']:<8} p={f['probability']:.3f} reliability={f['reliability']:.3f}"
                f"  {f['state']}" + (f" by {f['assessed_by']}" if f.get("assessed_by") else "")
            )
    for d in report.get("deliveries", []):
        lines.append(
            f"destination {d['destination']}: sent {d['sent']}, pending {d['pending']}, failed {d['failed']},"
            f" dead {d['dead']}" + (f"  last error: {d['last_error']}" if d.get("last_error") else "")
        )
    conflicts = report.get("conflicts", [])
    if conflicts:
        lines += ["", f"conflicts ({len(conflicts)}; kept, not overwritten):"]
        for c in conflicts[:50]:
            lines.append(
                f"  {c['kind']:<21} study {c['study_instance_uid']}  series {c['series_instance_uid']}"
                f"  instance {c['sop_instance_uid']}  ({c['detail']})"
            )
    cluster = report.get("cluster", {})
    if cluster.get("workers") or cluster.get("queues"):
        lines += ["", f"cluster (database: {cluster.get('database', '?')}):"]
        for w in cluster.get("workers", []):
            lines.append(
                f"  worker {w['worker_id']}  {'alive' if w['alive'] else 'silent'}  queues {w['queues']}"
                + (f"  running job #{w['current_job']}" if w.get("current_job") else "")
            )
        for kind, depth in sorted(cluster.get("queues", {}).items()):
            lines.append(f"  {kind:<15} waiting {depth.get('ready', 0)}, running {depth.get('running', 0)}")
    jobs = report["jobs"]
    if jobs:
        lines += ["", "jobs:"]
        for j in jobs[:50]:
            lines.append(
                f"  #{j['id']:<5} {j['kind']:<15} {j['state']:<8} attempts={j['attempts']}/{j['max_attempts']}"
                f"  {j['key']}" + (f"  last_error={j['last_error']}" if j["last_error"] else "")
            )
    return "\n".join(lines)
