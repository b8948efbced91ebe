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


def test_evaluate_clicks_starts_from_the_served_version_and_follows_an_annotator(cmr_readonly, tmp_path):
    """`evaluate clicks --refine-seconds`: the clicks also start from the version the guarded
    refinement serves after that long, and the annotation loop runs for both; every click count and
    every study is reported, and the labels saved before a study show in the Dice it opens with."""
    out = tmp_path / "c.json"
    args = ["evaluate", "clicks", "--studies", str(cmr_readonly), "--labels", '{"lv blood pool": 500}']
    args += ["--shots", "1", "--clicks", "2", "--repeats", "1", "--queries", "1", "--baselines", "reset"]
    cli_main([*args, "--refine-seconds", "4", "--annotator", "2", "--cap", "2", "--out", str(out)])
    res = _result(out)
    cells = {(r["method"], r["clicks"]) for r in res["rows"] if r["shots"] == 1}
    assert cells == {(m, c) for m in ("meta", "meta_refined", "reset") for c in range(3)}
    assert all(0.0 <= r["dice_mean"] <= 1.0 and r["n"] == 1 for r in res["rows"])
    (served,) = res["served"]  # how often the refinement had published a version when the clicks began
    assert (served["structure"], served["shots"], served["n"]) == ("lv blood pool", 1, 1) and served["refined"] in (
        0,
        1,
    )
    loop = json.loads(out.with_name("c_annotator.json").read_text())["rows"]
    assert {(r["method"], r["study"]) for r in loop} == {(m, s) for m in ("meta", "meta_refined") for s in (1, 2)}
    for r in loop:
        assert 0 <= r["clicks"] <= 2
        if r["study"] == 1:
            assert r["stage"] == "points alone" and r["dice_opened"] == 0.0
        else:  # one saved label: the study opens with that structure's prediction
            assert r["stage"] in ("head", "refined") and r["dice_opened"] > 0.3
            # a refined opening also says what the quick head of the same labels would have opened with
            assert ("dice_opened_head" in r) == (r["stage"] == "refined")
            if r["stage"] == "refined":
                assert r["dice_opened_head"] > 0.3
