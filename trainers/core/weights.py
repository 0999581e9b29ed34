"""What loading a checkpoint did, reported the same way by every family's `load_weights`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """What `load_weights` did. `ok` when every model tensor was loaded and every checkpoint tensor used."""

    source: str
    loaded: int = 0
    total: int = 0
    missing: list[str] = field(default_factory=list)  # model tensors left at their initial values
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors nothing used
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs model shape", skipped
    adapted: list[str] = field(default_factory=list)  # renames, interpolations, deliberate drops
    ignored: list[str] = field(default_factory=list)  # benign buffers (see _BENIGN_SUFFIXES)
    hints: list[str] = field(default_factory=list)  # likely config mistakes

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [f"Loaded {self.loaded}/{self.total} model tensors from {self.source}"]
        if self.adapted:
            parts.append("adapted: " + "; ".join(self.adapted))
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name} ({len(keys)}): {_summarize(keys)}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} benign buffers")
        if self.hints:
            parts.append("hint: " + " ".join(self.hints))
        return "; ".join(parts).rstrip(".") + "."


def _summarize(keys: list[str], limit: int = 8) -> str:
    """Group keys by their first two components so a missing module reads as one line."""
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        group = ".".join(parts[:2]) + ".*" if len(parts) > 2 else key
        groups[group] = groups.get(group, 0) + 1
    items = [f"{g} ({n})" if n > 1 else g for g, n in groups.items()]
    more = f", ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
