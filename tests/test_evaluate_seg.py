"""`metaapp evaluate seg` as a researcher runs it: the product beside a baseline, and `--joint`, on the
sample studies; each result is written as JSON + PNG and stamped with the weights it used."""

from __future__ import annotations

import json

from monailabel_metaapp.cli import main as cli_main
from monailabel_metaapp.core.checkpoint import DEFAULT_SEG_WEIGHTS
from monailabel_metaapp.provenance import sha256


def _result(path) -> dict:
    res = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 0
    prov = res["provenance"]
    assert prov["commit"] and list(prov["weights"].values()) == [sha256(DEFAULT_SEG_WEIGHTS)]
    return res


def test_evaluate_seg_scores_the_product_beside_a_baseline_and_structures_together(sample_store, tmp_path):
    base = ["evaluate", "seg", "--studies", str(sample_store), "--shots", "1", "--repeats", "1", "--queries", "1"]
    cli_main([*base, "--baselines", "proto", "--labels", '{"white matter": 2}', "--out", str(tmp_path / "e.json")])
    rows = _result(tmp_path / "e.json")["rows"]
    assert {(r["structure"], r["method"], r["n"]) for r in rows} == {
        ("white matter", "meta", 1),
        ("white matter", "proto", 1),
    }
    meta = next(r for r in rows if r["method"] == "meta")
    assert meta["dice_mean"] > 0.5  # one labelled study of this template-derived set segments the next one

    cli_main([*base, "--joint", "--out", str(tmp_path / "j.json")])
    res = _result(tmp_path / "j.json")
    names = {r["structure"] for r in res["rows"]}
    assert names == {"grey matter", "white matter", "csf"}
    assert {r["method"] for r in res["rows"]} == {"meta", "joint"}
    assert set(res["mean_gain_of_joint"]) == {"1"}
