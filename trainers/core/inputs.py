"""Reading the files a user points a trainer at (annotations, answer lists, vocabularies).

What is wrong with such a file is the user's to fix, not a bug: it raises `DataError`, whose message
names the file (and line) and the format expected, and `loop.main` reports it in one line with exit
code 2 (bad input), without a traceback.
"""

from __future__ import annotations

import json
import os
from typing import Any


class DataError(ValueError):
    """A data or annotation file the trainer cannot use; the message says where and what is expected."""


def read_json(path: str | os.PathLike, expected: str) -> Any:
    """The JSON value in `path`; DataError naming the line and column (`file:line:column:`) if it is
    not JSON. `expected` describes the format for the message, e.g. "a JSON list of objects with a
    'video' key"."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise not_json(f"{os.fspath(path)}:{e.lineno}", e, expected) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{os.fspath(path)}: not UTF-8 text ({e.reason}); expected {expected}") from None


def parse_json_line(line: str, where: str, expected: str) -> Any:
    """One line of a jsonl file; DataError naming `where` (file:line) if it is not JSON."""
    try:
        return json.loads(line.rstrip("\r\n"))  # columns count within the line, not past its end
    except json.JSONDecodeError as e:
        raise not_json(where, e, expected) from None


def not_json(where: str, error: json.JSONDecodeError, expected: str) -> DataError:
    """The DataError for text at `where` (file:line) that did not parse: `file:line:column: not valid
    JSON (why); expected <format>`."""
    return DataError(f"{where}:{error.colno}: not valid JSON ({error.msg}); expected {expected}")
