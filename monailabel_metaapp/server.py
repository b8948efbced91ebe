"""`metaapp serve`: MONAI Label's own server (uvicorn) with this app, on 127.0.0.1 by default."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from monailabel_metaapp import APP_DIR


def serve(
    studies: str, host: str = "127.0.0.1", port: int = 8000, conf: dict | None = None, build_samples: bool = False
) -> None:
    if build_samples and not Path(studies).exists():
        from monailabel_metaapp.samples import build_samples as build

        print(f"building {studies}/ from the MNI152 template bundled in nilearn ...")
        build(studies)
    if not studies.startswith(("http://", "https://")) and not Path(studies).is_dir():
        raise FileNotFoundError(f"studies folder {studies!r} does not exist")
    from monailabel_metaapp.lib.auth import exposure_warning

    if warning := exposure_warning(host):
        print(f"\n{'!' * 100}\n{warning}\n{'!' * 100}\n", file=sys.stderr, flush=True)
    args = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(APP_DIR),
        "--studies",
        studies,
        "--host",
        host,
        "--port",
        str(port),
    ]
    for k, v in (conf or {}).items():
        args += ["--conf", k, str(v)]
    os.execv(sys.executable, args)
