"""Typed configs shared by the trainer families (no torch: the launcher imports these)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any


def replace_checked(obj: Any, overrides: Mapping[str, Any], path: str) -> Any:
    """dataclasses.replace that recurses into nested dataclasses and rejects unknown keys."""
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        where = f" in '{path}'" if path else ""
        raise ValueError(f"unknown key(s) {unknown}{where}; valid keys: {sorted(names)}")
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in overrides.items():
        current = getattr(obj, key)
        if dataclasses.is_dataclass(hints[key]):
            if isinstance(value, Mapping):
                value = replace_checked(current, value, f"{path}.{key}" if path else key)
            elif not isinstance(value, hints[key]):
                raise ValueError(
                    f"'{path + '.' if path else ''}{key}' must be a mapping, got {type(value).__name__}"
                )
        changes[key] = value
    return dataclasses.replace(obj, **changes)
