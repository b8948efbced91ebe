"""The OHIF viewer MONAI Label bundles (3.10.0-beta.5), served from a route this app owns with two fixes.

OHIF's segmentation panel calls the `storeSegmentation` command without a data source, so
"Export DICOM SEG" fails with `TypeError: Cannot read properties of undefined (reading 'store')`
and a correction never reaches the PACS. The fix falls back to the active data source (MONAI Label's
`/proxy/dicom/`). Its point-prompts panel sends a deepgrow model's points without the label they
were placed for; the second fix adds `label`. The files in site-packages are never modified: the
patched files are built in memory when first asked for, so reinstalling monailabel keeps the fixes,
and a bundle without the expected code is served unchanged (with a warning) rather than broken. The
viewer's Google Fonts links are dropped too: nothing the app serves reaches outside 127.0.0.1."""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse, Response
from monailabel.utils.others.generic import get_mime_type

from monailabel_metaapp.lib.auth import USER, include_first

logger = logging.getLogger(__name__)

# (text in OHIF's cornerstone-dicom-seg commands module, what replaces it)
STORE_SEG_FIX = (
    "storeSegmentation: async ({\n      segmentationId,\n      dataSource\n    }) => {\n",
    "storeSegmentation: async ({\n      segmentationId,\n      dataSource\n    }) => {\n"
    "      dataSource = dataSource || extensionManager.getActiveDataSource()[0]; // monailabel_metaapp fix\n",
)


def ohif_dir() -> Path:
    """Folder of the OHIF build shipped inside the installed monailabel package (it may be missing)."""
    import monailabel.endpoints.ohif as stock

    return Path(stock.__file__).resolve().parent / "static" / "ohif"


# (text in OHIF's MONAI Label point-prompts panel, what replaces it): for a deepgrow model the panel
# sends the points but not the label they were placed for; the fix adds it, so the app corrects the
# structure the annotator picked (without it, the one whose head is most sure at the points)
POINT_LABEL_FIX = (
    "        params['foreground'] = fg;\n        params['background'] = bg;\n",
    "        params['foreground'] = fg;\n        params['background'] = bg;\n"
    "        params['label'] = currentLabel; // monailabel_metaapp fix\n",
)

# the viewer would fetch its font from Google: nothing may leave 127.0.0.1 (the system font is used)
EXTERNAL_FONTS = (
    re.compile(r"@import url\(https://fonts\.googleapis\.com/[^)]*\);?"),
    re.compile(r"<link[^>]*https://fonts\.(?:googleapis|gstatic)\.com[^>]*/?>"),
)


def patch(name: str, text: str) -> str | None:
    """The fixed text of one viewer file, so SEG export works, point prompts name their label and no
    font is fetched from outside.

    Args:
        name: the file's name; `.js` files get the `storeSegmentation` and point-label fixes, `.html`
            and `.css` files lose their Google Fonts links.
        text: the file's content.

    Returns:
        The fixed text, or None when the file needs no fix.
    """
    out = text
    old, new = STORE_SEG_FIX
    if name.endswith(".js") and old in out and "dataSource.store.dicom" in out:
        out = out.replace(old, new, 1)
    if name.endswith(".js") and POINT_LABEL_FIX[0] in out:
        out = out.replace(*POINT_LABEL_FIX, 1)
    if name.endswith((".html", ".css")):
        for pattern in EXTERNAL_FONTS:
            out = pattern.sub("", out)
    return out if out != text else None


@lru_cache(maxsize=1)
def patched_files() -> dict[str, bytes]:
    """The viewer files that need a fix, patched once and kept in memory (site-packages is never written).

    Logs a warning when no bundle holds the expected `storeSegmentation` code.

    Returns:
        File name -> patched content; empty when the viewer is not installed.
    """
    out: dict[str, bytes] = {}
    root = ohif_dir()
    if not root.is_dir():
        return out
    for f in [*root.glob("*.bundle.*.js"), *root.glob("*.css"), root / "index.html"]:
        if f.is_file():
            fixed = patch(f.name, f.read_text(errors="surrogateescape"))
            if fixed is not None:
                out[f.name] = fixed.encode(errors="surrogateescape")
    if not any(STORE_SEG_FIX[1] in v.decode(errors="ignore") for v in out.values()):
        logger.warning("OHIF bundle: the storeSegmentation code was not found; export is left as it is")
    return out


def install(app: FastAPI) -> None:
    """Serve `GET /ohif/{path}` ahead of MONAI Label's own route: the same files with the fixes applied.

    Unknown paths get `index.html` (the viewer's client-side routes); 404 when the viewer is not installed.

    Args:
        app: the MONAI Label FastAPI app.
    """
    router = APIRouter()

    @router.get("/ohif/{path:path}", include_in_schema=False, dependencies=[USER])  # as MONAI Label's
    async def ohif(path: str):
        root = ohif_dir().resolve()
        file = (root / path).resolve() if path else root / "index.html"
        if not file.is_relative_to(root) or not file.is_file():
            file = root / "index.html"  # client-side routes (/ohif/segmentation?...) are the app itself
        if not file.is_file():
            raise HTTPException(404, "the OHIF viewer is not installed with monailabel")
        fixed = patched_files().get(file.name) if file.parent == root else None
        if fixed is not None:
            return Response(fixed, media_type=get_mime_type(str(file)))
        return FileResponse(file, media_type=get_mime_type(str(file)))

    include_first(app, router)
