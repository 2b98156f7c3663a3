"""What one deploy run shares across its hosts, kept on pyinfra's state as `state.chatglm`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .factcache import FactCache
    from .report import FleetReport


@dataclass
class Run:
    facts: FactCache | None = None    # the run's fact reads (operations/factcache.py)
    report: FleetReport | None = None  # set once every host's settings passed (stages.begin)
    info: dict | None = None           # id, start time and control host (hostlock.run_info)


def of(state) -> Run:
    """This run's shared objects, made on first use."""
    run = getattr(state, "chatglm", None)
    if run is None:
        run = state.chatglm = Run()
    return run
