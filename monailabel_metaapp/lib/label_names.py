"""Which structure name each value of a saved label stands for.

Clients say it in different ways: 3D Slicer sends `label_info: [{"name", "idx"}]` (OHIF: `"id"`),
MONAI Label's own results carry `label_names: {name: value}`; without either, the datastore
folder's `labels.json` names the values. A value with no name is refused (logged, reported)."""

from __future__ import annotations

from typing import Any


def named_values(info: dict[str, Any] | None, defaults: dict[str, int]) -> dict[str, int]:
    """name -> value for one label, from its datastore info (the save request's params)."""
    info = info or {}
    items = info.get("label_info")
    if isinstance(items, list) and items:
        out = {}
        for it in items:
            if isinstance(it, dict) and it.get("name") is not None:
                v = it.get("idx", it.get("id", it.get("value")))
                if v is not None:
                    out[str(it["name"]).strip()] = int(v)
        if out:
            return out
    for src in (info, info.get("params") or {}):
        names = src.get("label_names") if isinstance(src, dict) else None
        if isinstance(names, dict) and names:
            return {str(k): int(v) for k, v in names.items() if int(v) > 0}
    return dict(defaults)


def split_named(values: list[int], names: dict[str, int]) -> tuple[dict[str, int], list[int]]:
    """({name: value} present in the label, [values present that have no name])."""
    by_value = {v: n for n, v in names.items()}
    named = {by_value[v]: v for v in values if v in by_value}
    return named, [v for v in values if v not in by_value]
