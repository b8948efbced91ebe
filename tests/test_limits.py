"""An upload over `max_upload_mb` is refused with 413 and its reason before the server reads it whole,
whether its size is declared or it arrives in chunks; nothing is stored and the server keeps serving."""

from __future__ import annotations

import hashlib
import json
import os

import requests
from conftest import sample_label


def stored(store) -> dict[str, str]:
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((store / "labels").rglob("*"))
        if p.is_file()
    }


def test_an_upload_over_the_bound_gets_413_and_nothing_is_stored(sample_store, start_server):
    server = start_server(sample_store, conf={"max_upload_mb": "1"})
    url = f"{server.url}/datastore/label?image=mni_01&tag=final"
    params = {"params": json.dumps({"label_info": [{"name": "white matter", "idx": 2}]})}
    before = stored(sample_store)

    big = os.urandom(2 * 2**20)  # declared in Content-Length: refused before the body is read
    r = requests.put(url, files={"label": ("l.nii.gz", big)}, data=params, timeout=60)
    assert r.status_code == 413 and "max_upload_mb" in r.json()["detail"], r.text

    def chunks():  # the same multipart upload with no Content-Length: counted as it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="label"; filename="l.nii.gz"\r\n\r\n'
        for _ in range(40):
            yield os.urandom(64 * 1024)
        yield b"\r\n--b--\r\n"

    r = requests.put(url, data=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=60)
    assert r.status_code == 413 and "more than" in r.json()["detail"], r.text
    assert stored(sample_store) == before

    # a label within the bound is stored as ever
    label = sample_label(sample_store, "mni_01").read_bytes()
    r = requests.put(url, files={"label": ("l.nii.gz", label)}, data=params, timeout=60)
    assert r.status_code == 200, r.text
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
