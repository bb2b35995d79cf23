"""Config files for launched stacks: the packaged ``ops/cohort.toml`` with overrides, written as TOML."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from producers.settings import DEFAULT_CONFIG


def default_config() -> dict[str, Any]:
    with DEFAULT_CONFIG.open("rb") as fh:
        return tomllib.load(fh)


def merged(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base`` (lists, such as ``tiers``, are replaced)."""
    result = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def dump_toml(data: dict[str, Any]) -> str:
    """TOML for plain config data (tables, arrays of tables, scalars, lists of scalars)."""
    lines: list[str] = []
    _table(lines, [], data)
    return "\n".join(lines) + "\n"


def _table(lines: list[str], path: list[str], table: dict[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_array(v)}
    if path and (scalars or not table):
        lines.append(f"[{'.'.join(_key(p) for p in path)}]")
    for key, value in scalars.items():
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        if isinstance(value, dict):
            _table(lines, [*path, key], value)
        elif _is_table_array(value):
            for entry in value:
                lines.append(f"[[{'.'.join(_key(p) for p in [*path, key])}]]")
                for k, v in entry.items():
                    lines.append(f"{_key(k)} = {_value(v)}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else '"' + key.replace('"', '\\"') + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def write_config(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    path.write_text(dump_toml(merged(default_config(), overrides)))
    return path
