"""Reading what users give forkrl: data rows with file:line errors, and `module:function` references.
Part of the ground floor: imports only forkrl.errors."""
from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

from forkrl.errors import DataError


def load_function(ref: str) -> Callable:
    """Import `package.module:function` (or a path `file.py:function`)."""
    if ":" not in ref:
        raise ValueError(f"a function reference looks like 'module:function', got {ref!r}")
    mod_name, fn_name = ref.rsplit(":", 1)
    if mod_name.endswith(".py"):
        import sys
        folder = str(Path(mod_name).resolve().parent)
        if folder not in sys.path:  # as `python file.py` would: the file's own folder is importable
            sys.path.insert(0, folder)
        spec = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {mod_name}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        import sys
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # like `python -m`: modules next to the user's config
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ImportError(f"cannot import {mod_name!r} for the function {ref!r}: {e}") from e
    try:
        return getattr(module, fn_name)
    except AttributeError:
        raise AttributeError(f"{mod_name} has no function {fn_name!r}") from None


def read_text(path: Path) -> str:
    """A data file's text as UTF-8; a byte that is not names the file, line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a .jsonl, .json (JSON Lines or one array of objects; an array's
    rows are numbered by position) or .parquet file; a bad row names file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        import pandas as pd
        return [(i + 1, row) for i, row in enumerate(pd.read_parquet(path).to_dict("records"))]
    text = read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        rows = []
        for i, row in enumerate(items, 1):
            if not isinstance(row, dict):
                raise DataError(f"{path}: item {i} of the array is a {type(row).__name__}, not a JSON object")
            rows.append((i, row))
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows
