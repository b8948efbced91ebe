"""Results name the commit they were measured at, also on a machine that runs a copy of the checkout
(a GPU machine whose copy's git metadata may be older than its files)."""

from __future__ import annotations

import subprocess

from monailabel_metaapp.provenance import REPO, stamp


def test_stamp_names_the_checkout_commit_or_the_one_its_sender_names(monkeypatch):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    monkeypatch.delenv("METAAPP_COMMIT", raising=False)
    assert stamp([])["commit"] == (head or None)
    monkeypatch.setenv("METAAPP_COMMIT", "0123abc")
    prov = stamp([])
    assert prov["commit"] == "0123abc" and prov["dirty"] is None
