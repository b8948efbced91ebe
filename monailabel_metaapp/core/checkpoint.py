"""Checkpoint files: a plain state_dict (`torch.load(weights_only=True)`) plus a JSON sidecar with
the architecture and training summary. Every write is atomic (temp file + os.replace), so a
reader never sees half a file."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from monailabel_metaapp.core.cls_model import ClsModelConfig, FewShotClsModel
from monailabel_metaapp.core.networks import FewShotSegModel, SegModelConfig

DEFAULT_SEG_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "metaseg.pt"
DEFAULT_CLS_WEIGHTS = DEFAULT_SEG_WEIGHTS.with_name("metacls.pt")


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) then rename over `path` in one step (folders are made).

    Args:
        path: the file to write.
        write: writes the content to the temporary path it is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_torch(path: str | Path, obj: Any) -> None:
    """`torch.save` atomically. Serialised in memory first, so a full disk raises a plain
    `OSError` (ENOSPC) rather than torch's zip-writer error, and never leaves part of a file.

    Args:
        path: the file to write.
        obj: tensors or a dict of them (weights, a training state).
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda p: Path(p).write_bytes(buf.getbuffer()))


def save_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically (what JSON cannot hold is written as its str).

    Args:
        path: the file to write.
        data: what to write.
    """
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=2, default=str)))


def sidecar(path: str | Path) -> Path:
    """The JSON file that describes a weights file (architecture, training summary).

    Args:
        path: the weights file.
    """
    return Path(str(path) + ".json")


def save_model(model: FewShotSegModel | FewShotClsModel, path: str | Path, info: dict | None = None) -> None:
    """Weights first, sidecar second: a sidecar always describes weights that exist.

    Args:
        model: the model to save (its `cfg` goes in the sidecar).
        path: the weights file.
        info: more to record in the sidecar (training summary, provenance).
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: torch.save(state, p))
    save_json(sidecar(path), {"config": model.cfg.to_dict(), **(info or {})})


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> FewShotSegModel:
    """Rebuild a model from its weights + sidecar (the shipped checkpoint when path is None).

    Args:
        path: the weights file.
        device: where the model goes; it is returned in eval mode.
    """
    path = Path(path) if path else DEFAULT_SEG_WEIGHTS
    meta = json.loads(sidecar(path).read_text()) if sidecar(path).exists() else {}
    model = FewShotSegModel(SegModelConfig.from_dict(meta.get("config", {})))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def load_cls_model(path: str | Path, device: str | torch.device = "cpu") -> FewShotClsModel:
    """Rebuild a few-shot classifier from its weights + sidecar.

    Args:
        path: the weights file.
        device: where the model goes; it is returned in eval mode.
    """
    meta = json.loads(sidecar(path).read_text()) if sidecar(path).exists() else {}
    model = FewShotClsModel(ClsModelConfig.from_dict(meta.get("config", {})))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "log_lr.W" in state:
        raise ValueError(
            f"{path} is a classifier from before the two-head design (one head on the last block): "
            "meta-train it again with `metaapp meta-train --task cls` (see the model card's command)"
        )
    model.load_state_dict(state)
    return model.to(device).eval()


def pick_device(device: str = "auto") -> torch.device:
    """The torch device to run on; a CUDA device asked for but absent is an error, not a fallback.

    Args:
        device: "auto" (CUDA when there is one, else the CPU), "cpu", "cuda", "cuda:1", ...
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)
