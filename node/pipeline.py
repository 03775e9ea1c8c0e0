"""The job for one completed series, stage by stage (filled in by the pipeline issue)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.app import Node


def run_series(node: Node, series_uid: str) -> None:
    """Run every stage on one series and record the outcome in the index."""
    node.index.update_series(series_uid, timings={})
