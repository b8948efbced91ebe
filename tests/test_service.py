"""The app runtime on a real datastore, in-process: meta-trained site weights are picked up."""

from __future__ import annotations

import shutil

from monailabel.datastore.local import LocalDatastore

from monailabel_metaapp.core.checkpoint import DEFAULT_SEG_WEIGHTS, sidecar
from monailabel_metaapp.lib.seg.service import SegService
from monailabel_metaapp.shared_data import CMR_STRUCTURES


def test_new_site_weights_replace_the_encoder_and_every_head_is_readapted(cmr_store, tmp_path):
    ds = LocalDatastore(str(cmr_store), extensions=["*.nii.gz"], auto_reload=False)
    service = SegService(ds, tmp_path / "store", str(DEFAULT_SEG_WEIGHTS), device="cpu", default_names=CMR_STRUCTURES)
    assert sorted(service.sync()) == sorted(CMR_STRUCTURES)
    assert service.queue.wait_idle(300)
    before = service.heads.snapshot()
    assert all(s["version"] == 1 and s["n_labels"] == 2 for s in before.values())
    assert not service.refresh_model(), "no site weights yet: nothing to switch"
    # what the meta-train task publishes: weights, then their sidecar
    service.site_model.parent.mkdir(parents=True)
    shutil.copy(DEFAULT_SEG_WEIGHTS, service.site_model)
    shutil.copy(sidecar(DEFAULT_SEG_WEIGHTS), sidecar(service.site_model))
    assert service.refresh_model()
    assert service.model_path == str(service.site_model)
    assert service.queue.wait_idle(300)
    after = service.heads.snapshot()
    assert all(after[n]["version"] == 2 for n in CMR_STRUCTURES), after
    img, params = service.infer(ds.get_image_uri("cmr_28"))
    assert set(params["head_versions"]) == set(CMR_STRUCTURES)


def test_the_study_cache_keeps_to_its_bound_and_says_what_it_holds(cmr_store, tmp_path):
    """`embedding_cache_mb` bounds the studies kept embedded; `/info/` reports them from `memory()`."""
    ds = LocalDatastore(str(cmr_store), extensions=["*.nii.gz"], auto_reload=False)
    roomy = SegService(ds, tmp_path / "a", str(DEFAULT_SEG_WEIGHTS), device="cpu")
    tight = SegService(ds, tmp_path / "b", str(DEFAULT_SEG_WEIGHTS), device="cpu", cache_mb=1)
    for service in (roomy, tight):
        for image in ("cmr_28", "cmr_29"):
            service.study(ds.get_image_uri(image))
    held = roomy.memory()["studies"]
    assert held["items"] == 2 and held["max_mb"] == 2048 and held["mb"] > 1
    tight_held = tight.memory()["studies"]
    assert tight_held["items"] == 1 and tight_held["max_mb"] == 1, "over the bound only the newest study stays"
