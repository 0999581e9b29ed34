"""Job outcomes and the results table printed at the end of a sweep.

A trainer reports by writing `<run_dir>/metrics.json`:
    {"task": "retrieval", "headline": {"R@1": 41.7, ...}, "chance": {"R@1": 1.7, ...}, "metrics": {...}}
`headline` holds the few numbers shown in the table, `chance` what a random model scores on them.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Final states. Anything else is still going.
COMPLETED, FAILED, CANCELLED, TIMEOUT = "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"
TERMINAL = {COMPLETED, FAILED, CANCELLED, TIMEOUT, "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


@dataclass
class JobResult:
    num: int
    label: str
    state: str
    exit_code: int | None = None
    log_path: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.state == COMPLETED


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def tail(path: Path | None, lines: int = 20) -> str:
    """The last lines of a log file, or a note saying there is none."""
    if path is None or not Path(path).exists():
        return f"(no log at {path})"
    with open(path, errors="replace") as f:
        return "".join(deque(f, maxlen=lines)).rstrip()


def _fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def format_table(results: list[JobResult]) -> str:
    """One row per job: its overrides, state, headline metrics with chance level beside them."""
    columns: list[str] = []
    for r in results:
        for key in r.metrics.get("headline", {}):
            if key not in columns:
                columns.append(key)
    header = ["job", "overrides", "state", *[f"{c} (chance)" for c in columns]]
    rows = []
    for r in results:
        state = r.state if r.exit_code in (None, 0) else f"{r.state} (exit {r.exit_code})"
        headline, chance = r.metrics.get("headline", {}), r.metrics.get("chance", {})
        cells = [f"{_fmt(headline.get(c))} ({_fmt(chance.get(c))})" for c in columns]
        rows.append([str(r.num), r.label, state, *cells])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def failure_report(results: list[JobResult]) -> str:
    """For each failed job: state, exit code and the tail of its log (a cancelled job was stopped on
    purpose: the table says so)."""
    parts = []
    for r in results:
        if r.ok or r.state == CANCELLED:
            continue
        parts.append(f"job {r.num} ({r.label}) {r.state}, exit code {r.exit_code}; log {r.log_path}:")
        parts.append("    " + (r.log_tail or "(empty log)").replace("\n", "\n    "))
    return "\n".join(parts)


def progress_text(run_dir: Path) -> str:
    """A running job's progress, from the `progress.json` its trainer keeps up to date."""
    try:
        p = json.loads((Path(run_dir) / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return "starting"
    if p.get("phase") == "eval":
        return "evaluating"
    total = p.get("total_steps") or 0
    pct = f" {100 * p['step'] / total:.0f}%" if total else ""
    loss = f" loss {p['loss']:.3f}" if isinstance(p.get("loss"), int | float) else ""
    return f"step {p.get('step', 0)}/{total}{pct}{loss}"


class StatusLine:
    """One status line, rewritten in place on a terminal; elsewhere (logs, CI) printed when it
    changes, at most every `every_s` seconds."""

    def __init__(self, every_s: float = 15.0, tty: bool | None = None) -> None:
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.every_s = every_s
        self.last_time = 0.0
        self.last_text = ""

    def show(self, text: str) -> None:
        now = time.monotonic()
        if self.tty:
            print("\r\033[K" + text[:200], end="", flush=True)
        elif text != self.last_text and now - self.last_time > self.every_s:
            print(text, flush=True)
            self.last_time = now
        self.last_text = text

    def done(self) -> None:
        if self.tty:
            print("\r\033[K", end="", flush=True)
