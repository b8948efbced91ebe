"""Which structure name each value of a saved label stands for.

Clients say it in different ways: 3D Slicer sends `label_info: [{"name", "idx"}]` (OHIF: `"id"`),
MONAI Label's own results carry `label_names: {name: value}`; without either, the datastore
folder's `labels.json` names the values. A value with no name is refused (logged, reported)."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import SimpleITK as sitk

from monailabel_metaapp.core.volume import read_image


def named_values(info: dict[str, Any] | None, defaults: dict[str, int]) -> dict[str, int]:
    """name -> value for one label, from its datastore info (the save request's params).

    Args:
        info: the label's datastore info (`label_info`, `label_names` or `params.label_names`).
        defaults: the names to fall back on (the datastore folder's `labels.json`).
    """
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
    """({name: value} present in the label, [values present that have no name]).

    Args:
        values: the label values present in a label map.
        names: name -> value, as `named_values` gives it.
    """
    by_value = {v: n for n, v in names.items()}
    named = {by_value[v]: v for v in values if v in by_value}
    return named, [v for v in values if v not in by_value]


def final_label_structures(datastore: Any, image_id: str, defaults: dict[str, int]) -> dict[str, int]:
    """name -> value of the named structures in an image's final label.

    The names checked when the label was saved (`label_info.metaapp.named`) when there, else the
    label's own naming rules applied to the values its file holds.

    Args:
        datastore: a MONAI Label datastore holding a final label of the image.
        image_id: the image.
        defaults: the names to fall back on (the datastore folder's `labels.json`).
    """
    info = datastore.get_label_info(image_id, "final") or {}
    checked = info.get("metaapp")
    if checked:
        return dict(checked["named"])
    path = datastore.get_label_uri(image_id, "final")
    st = os.stat(path)
    return split_named(list(label_values(str(path), st.st_mtime_ns, st.st_size)), named_values(info, defaults))[0]


@functools.lru_cache(maxsize=4096)
def label_values(path: str, mtime_ns: int, size: int) -> tuple[int, ...]:
    """The structure values a label file holds (> 0). Keyed by the file's stamp, so a label written
    again is read again; a label placed in the datastore folder by hand is read once, not at every
    look-up (click corrections, refinement and scoring ask for every label's structures).

    Args:
        path: the label file.
        mtime_ns: its modification time, part of the key.
        size: its size in bytes, part of the key.
    """
    return tuple(int(v) for v in np.unique(sitk.GetArrayFromImage(read_image(path))) if v > 0)
