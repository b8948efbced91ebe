"""Build the PACS datastore from MONAI Label's settings (`--studies http://.../dicom-web`), without the
dcmqi download MONAI Label's own DICOMweb start-up does (SEGs are written with pydicom-seg)."""

from __future__ import annotations

import json
import logging

from dicomweb_client.session_utils import create_session_from_user_pass
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX

from monailabel_metaapp.pacs.datastore import PacsDatastore

logger = logging.getLogger(__name__)


def pacs_datastore(url: str, conf: dict[str, str]) -> PacsDatastore:
    """The PACS datastore of a DICOMweb address, with MONAI Label's credentials, prefixes and cache.

    Args:
        url: the DICOMweb root, such as http://127.0.0.1:8042/dicom-web.
        conf: the app's conf: `pacs_poll_seconds` (default 5), `labels` ({"name": value} JSON: the
            names of label values).
    """
    user = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME
    password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
    session = create_session_from_user_pass(user, password) if user and password else None
    client = DICOMwebClientX(
        url=url,
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    timeout = settings.MONAI_LABEL_DICOMWEB_READ_TIMEOUT
    # dicomweb-client retries every failure 5 times with exponential waits (30 s on a refused connection):
    # one quick retry, so a PACS that is down is reported in a second and the poller's interval stays bounded
    client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=250)
    client._session.request = _with_timeout(client._session.request, max(timeout, 30.0))
    cache = (settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    names = json.loads(conf["labels"]) if conf.get("labels") else {}
    ds = PacsDatastore(
        client,
        search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
        cache_path=cache or None,
        default_names={str(k): int(v) for k, v in names.items()},
        poll_seconds=float(conf.get("pacs_poll_seconds", 5)),
    )
    logger.info("PACS %s (filter %s), cache %s", url, settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER, ds.local_root)
    return ds


def _with_timeout(request, seconds: float):
    """dicomweb-client sets no timeout: a PACS that hangs would hang the poller and the requests."""

    def call(method, url, **kwargs):
        kwargs.setdefault("timeout", seconds)
        return request(method, url, **kwargs)

    return call
