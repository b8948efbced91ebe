"""Background refinement through the real server and real clients: after the quick head, a refined
network goes live only when it beats the quick head on a labelled study it was not trained on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch
from monailabel.client import MONAILabelClient

from monailabel_metaapp.core.adaptation import SegAdapter
from monailabel_metaapp.core.checkpoint import load_model
from monailabel_metaapp.core.precision import bf16_native, training_autocast
from monailabel_metaapp.core.refine import (
    RefineConfig,
    Refinement,
    TwoStartRefinement,
    agreement_needed,
    fresh_adapter,
    pooled_dice,
    refined_adapter,
    start_refinement,
    study_split,
)
from monailabel_metaapp.core.volume import label_slices, read_image, to_slices
from monailabel_metaapp.evaluate_timeline import served_after
from monailabel_metaapp.lib.configs.fewshot_seg import refine_config, unseen_structures
from monailabel_metaapp.lib.seg.refinement import HELD, RefinementWorker
from monailabel_metaapp.shared_data import one_structure_label


def _only(store: Path, value: int) -> None:
    """Keep one structure in every stored label of the store."""
    for p in (store / "labels" / "final").glob("*.nii.gz"):
        img = sitk.ReadImage(str(p))
        a = sitk.GetArrayFromImage(img)
        out = sitk.GetImageFromArray(np.where(a == value, a, 0).astype(np.int16))
        out.CopyInformation(img)
        sitk.WriteImage(out, str(p))


def _refinement(server, name: str) -> dict:
    return server.structures()[name].get("refinement") or {}


def _wait(server, predicate, timeout: float, what: str) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = server.structures()
        if predicate(st):
            return st
        time.sleep(1.0)
    raise TimeoutError(f"{what} not reached in {timeout} s: {server.structures()}\n{server.log_tail()}")


def test_refined_version_goes_live_restarts_on_save_survives_restart_and_rolls_back(
    cmr_store, shared, start_server, tmp_path
):
    _only(cmr_store, 500)
    server = start_server(cmr_store, conf={"refine": "true", "refine_budget_seconds": 120})
    name = "lv blood pool"
    server.wait_ready(lv_blood_pool=1)
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))

    # inference keeps answering while the structure refines
    _wait(server, lambda st: (st[name].get("refinement") or {}).get("state") == "refining", 120, "refining")
    res, params = client.infer("fewshot_seg", "cmr_30", {})
    assert params["label_names"] == {name: 1} and Path(res).exists()

    # a refined version goes live once it beats the quick head on the held-out study
    st = _wait(server, lambda st: st[name]["stage"] == "refined", 400, "a refined version")
    live = st[name]
    ref = live["refinement"]
    assert live["val_dice"] > ref["head_val_dice"], "published without beating the quick head"
    assert live["start"] in ("warm", "fresh"), "a refined version names where its network started"
    starts = ref["starts"]  # two labels: both starts train, each shows its seconds and best held-out Dice
    assert set(starts) == {"warm", "fresh"} and starts[live["start"]]["best_val_dice"] is not None
    assert 0 < sum(s["seconds"] for s in starts.values()) <= ref["seconds"] + 0.2
    res, params = client.infer("fewshot_seg", "cmr_30", {})
    assert params["head_stages"] == {name: "refined"} and params["head_versions"][name] == live["version"]
    pred = sitk.GetArrayFromImage(sitk.ReadImage(res)) == 1
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(shared / "cmr_bssfp" / "label_30.nii.gz"))) == 500
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.5

    # a restart keeps the live refined version, its weights on disk, loadable without pickles
    server.stop()
    server.start()
    st = server.wait_ready()
    assert st[name]["version"] >= live["version"] and st[name]["stage"] == "refined"
    enc = next((cmr_store / ".metaapp" / "heads").rglob(f"v{live['version']:04d}.encoder.pt"))
    assert torch.load(enc, weights_only=True)
    _, params = client.infer("fewshot_seg", "cmr_30", {})
    assert params["head_stages"] == {name: "refined"}
    live = server.structures()[name]

    # a new save: a quick head from 3 labels goes live at once, and refinement restarts with the label
    lbl = one_structure_label(shared / "cmr_bssfp" / "label_28.nii.gz", 500, tmp_path / "l28.nii.gz")
    client.save_label("cmr_28", str(lbl), params={"label_info": [{"name": name, "idx": 1}]})
    st = server.wait_ready()
    assert st[name]["n_labels"] == 3 and st[name]["stage"] == "head"
    _wait(server, lambda st: (st[name].get("refinement") or {}).get("labels") == 3, 120, "refinement on 3 labels")

    # rollback covers both kinds of version
    refined_version = live["version"]
    r = requests.post(f"{server.url}/metaapp/structures/{name}/rollback?version={refined_version}", timeout=30)
    assert r.status_code == 200 and r.json()["stage"] == "refined"
    assert server.structures()[name]["refinement"]["state"] == "held after rollback"
    r = requests.post(f"{server.url}/metaapp/structures/{name}/rollback?version=1", timeout=30)
    assert r.status_code == 200 and r.json()["stage"] == "head"
    r = requests.post(f"{server.url}/metaapp/structures/{name}/rollback?version={refined_version}", timeout=30)
    _, params = client.infer("fewshot_seg", "cmr_30", {})
    assert params["head_stages"] == {name: "refined"} and params["head_versions"][name] == refined_version


def test_a_refinement_that_cannot_beat_the_head_is_never_published(cmr_store, start_server):
    """A budget too small for one validation: the run ends, the quick head stays live."""
    _only(cmr_store, 500)
    server = start_server(cmr_store, conf={"refine": "true", "refine_budget_seconds": 0.01})
    name = "lv blood pool"
    server.wait_ready(lv_blood_pool=1)
    st = _wait(
        server, lambda st: (st[name].get("refinement") or {}).get("state") == "budget spent", 180, "budget spent"
    )
    assert st[name]["stage"] == "head" and st[name]["version"] == 1
    registry = json.loads((cmr_store / ".metaapp" / "heads" / "registry.json").read_text())["structures"][name]
    assert registry["versions"] == [1], "a version was written by a refinement that never validated"


def test_refinement_resumes_from_its_checkpoint_after_kill_9(cmr_store, start_server):
    """Declared new to the encoder (`refine_unseen` lists it), the structure refines from fresh weights,
    and after a kill -9 that run goes on from its checkpoint."""
    _only(cmr_store, 500)
    conf = {"refine": "true", "refine_budget_seconds": 100000, "refine_unseen": "LV blood pool, spleen"}
    server = start_server(cmr_store, conf=conf)
    name = "lv blood pool"
    server.wait_ready(lv_blood_pool=1)
    ckpt = cmr_store / ".metaapp" / "refine" / "lv_blood_pool" / "state.pt"
    _wait(server, lambda st: ckpt.exists(), 400, "a refinement checkpoint")
    state = torch.load(ckpt, weights_only=True)["run"]
    steps = state["steps"]
    assert steps > 0, "a checkpoint of a run that learned nothing"
    assert state["start"] == "fresh" and _refinement(server, name)["start"] == "fresh"
    version = server.structures()[name]["version"]
    server.proc.kill()  # kill -9 in the middle of the refinement: no clean-up of any kind
    server.proc.wait(30)
    server.start()
    assert requests.get(f"{server.url}/info/", timeout=30).json()["metaapp"]["damaged_at_start"] == []
    st = _wait(server, lambda st: (st[name].get("refinement") or {}).get("steps", 0) > steps, 240, "resumed steps")
    assert st[name]["refinement"]["state"] == "refining" and st[name]["version"] >= version
    assert st[name]["refinement"]["start"] == "fresh"


# -- the core, without a server ------------------------------------------------------------------


def test_the_guard_holds_out_the_middle_third_of_every_study_with_the_structure():
    a = torch.zeros(4, 8, 8, dtype=torch.bool)
    a[1:3, 2:4, 2:4] = True  # 2 slices hold the structure: one of them is held out
    empty = torch.zeros_like(a)
    train, val = study_split([a, a.clone(), empty])
    assert val == [[1], [1], []] and train == [[0, 2, 3], [0, 2, 3], [0, 1, 2, 3]]
    one = torch.zeros(12, 8, 8, dtype=torch.bool)
    one[2:11, 2:4, 2:4] = True  # 9 slices hold the structure: the middle 3 are held out, never trained on
    train, val = study_split([one, empty])
    assert val == [[5, 6, 7], []] and train == [[0, 1, 2, 3, 4, 8, 9, 10, 11], list(range(4))]
    assert study_split([empty, empty])[1] == [[], []]  # no study holds the structure: nothing to check on
    assert pooled_dice([torch.ones(2, 2)], [torch.ones(2, 2)]) == 1.0


def test_refinement_settings_parse_from_text_and_an_unknown_one_is_refused():
    cfg = RefineConfig.parse("val_every=30, distill=0.5")
    assert cfg.val_every == 30 and isinstance(cfg.val_every, int) and cfg.distill == 0.5
    assert cfg.lr_encoder == RefineConfig().lr_encoder
    with pytest.raises(ValueError, match="crops"):
        RefineConfig.parse("crops=96")


def test_the_app_conf_declares_structures_new_to_the_encoder(tmp_path):
    """`refine_unseen` declares every structure (`true`) or the ones it lists new to the encoder: only
    those refine from fresh weights; refinement stays off unless asked for."""
    assert refine_config({}) is None and refine_config({"refine_unseen": "true"}) is None
    assert refine_config({"refine": "true"}).fresh_first is False
    assert unseen_structures({}) == frozenset() == unseen_structures({"refine_unseen": "no"})
    assert unseen_structures({"refine_unseen": "TRUE"}) is True
    listed = unseen_structures({"refine_unseen": "RV blood pool, spleen"})
    assert listed == {"rv blood pool", "spleen"}
    worker = RefinementWorker(None, tmp_path, refine_config({"refine": "true"}), unseen=listed)
    assert worker.settings("rv blood pool").fresh_first and worker.settings("Spleen").fresh_first
    assert not worker.settings("lv blood pool").fresh_first
    everyone = RefinementWorker(None, tmp_path, RefineConfig(), unseen=True)
    assert everyone.settings("lv blood pool").fresh_first


def test_with_one_label_the_quick_head_teaches_the_candidate_on_other_studies(shared):
    """One labelled study: a block of its slices checks the candidate, and distillation on an
    unlabelled study keeps the candidate's prediction there closer to the quick head's than fitting
    the label alone does (fine-tuning on one study sank known structures on others)."""
    (s1, m1), (s2, _) = _cmr(shared, 5, 600), _cmr(shared, 12, 600)
    adapter = SegAdapter(load_model(None), "cpu")
    quick = adapter.adapt([s1], [m1])
    teacher = adapter.predict(s2, [quick])[0] >= 0.5
    agreement = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        cfg = RefineConfig(distill=weight, augment=0.0)
        run = Refinement(adapter, [s1], [m1], quick, cfg, anchors=[s2])
        assert run.checkable and run.val_idx[0] and not set(run.val_idx[0]) & set(run.train_idx[0])
        assert bool(run.teacher) == (weight > 0)
        for _ in range(20):
            run.step()
        run.model.encoder.net.eval()
        agreement[weight] = pooled_dice([run.adapter.predict(s2, [run.head()])[0]], [teacher])
    assert agreement[1.0] > agreement[0.0], agreement


def test_a_second_label_continues_the_run_without_the_teacher_at_the_current_pace(shared):
    """With one labelled study the quick head teaches the run; when a second label arrives the run
    continues from its state without a teacher, and at the rates of the settings it runs under now,
    not those its state was saved with (a state saved under other settings survives an upgrade)."""
    (s1, m1), (s2, m2) = _cmr(shared, 5, 600), _cmr(shared, 12, 600)
    adapter = SegAdapter(load_model(None), "cpu")
    one = Refinement(adapter, [s1], [m1], adapter.adapt([s1], [m1]), RefineConfig(lr_encoder=3e-4), anchors=[s2])
    one.step()
    assert one.teacher and one.opt.param_groups[0]["lr"] == 3e-4
    cfg = RefineConfig()
    two = Refinement(
        adapter, [s1, s2], [m1, m2], adapter.adapt([s1, s2], [m1, m2]), cfg, state=one.state_dict(), anchors=[s2]
    )
    assert not two.teacher and two.steps == one.steps
    assert two.opt.param_groups[0]["lr"] == cfg.lr_encoder != 3e-4


def test_a_structure_new_to_the_encoder_refines_from_fresh_weights_alone_at_every_number_of_labels(shared):
    """`fresh_first` (conf `refine_unseen`): from one label the run trains freshly drawn weights with no
    teacher and no agreement check, while the live quick head of the meta-learned encoder still sets
    the guard's bar on the held-out block; when a second label arrives that run goes on alone, with all
    the seconds (no warm start beside it), and a two-start run declared new later continues its fresh run."""
    (s1, m1), (s2, m2), (s3, _) = _cmr(shared, 5, 600), _cmr(shared, 12, 600), _cmr(shared, 20, 600)
    adapter = SegAdapter(load_model(None), "cpu")
    quick = adapter.adapt([s1], [m1])
    cfg = RefineConfig(val_every=4, fresh_first=True)
    warm = start_refinement(adapter, [s1], [m1], quick, RefineConfig(val_every=4), anchors=[s3])
    run = start_refinement(adapter, [s1], [m1], quick, cfg, anchors=[s3])
    assert isinstance(run, Refinement) and (warm.start, run.start) == ("warm", "fresh")
    meta = adapter.model.encoder.net.state_dict()
    assert any(not torch.equal(v, run.encoder_state()[k]) for k, v in meta.items() if v.is_floating_point())
    assert run.baseline == pytest.approx(warm.baseline)  # the live head's bar, not a fresh head's
    assert warm.teacher and warm.cfg.min_agreement > 0 and warm.anchors
    assert not run.teacher and run.cfg.distill == 0 and run.cfg.min_agreement == 0 and not run.anchors
    for _ in range(cfg.val_every):
        run.advance()
    assert run.history and run.state_dict()["start"] == "fresh"
    again = start_refinement(adapter, [s1], [m1], quick, cfg, state=run.state_dict(), anchors=[s3])
    assert again.start == "fresh" and again.steps == run.steps
    assert start_refinement(adapter, [s1], [m1], quick, cfg, state=warm.state_dict()).steps == 0
    undeclared = start_refinement(adapter, [s1], [m1], quick, RefineConfig(val_every=4), state=run.state_dict())
    assert undeclared.start == "warm" and undeclared.steps == 0  # fresh weights never continue as the warm run
    quick2 = adapter.adapt([s1, s2], [m1, m2])
    two = start_refinement(adapter, [s1, s2], [m1, m2], quick2, cfg, state=run.state_dict(), anchors=[s3])
    assert isinstance(two, Refinement) and two.start == "fresh" and two.steps == run.steps
    assert two.cfg.min_agreement == 0 and not two.anchors and not two.teacher
    default = start_refinement(adapter, [s1, s2], [m1, m2], quick2, RefineConfig(val_every=4), anchors=[s3])
    assert isinstance(default, TwoStartRefinement) and default.cfg.min_agreement > 0
    default.start_fresh()
    for _ in range(2):
        default.fresh.step()
    declared = start_refinement(adapter, [s1, s2], [m1, m2], quick2, cfg, state=default.state_dict())
    assert declared.start == "fresh" and declared.steps == 2 == default.fresh.steps


def test_a_quick_head_that_misses_the_structure_cannot_veto_a_candidate_that_finds_it():
    """The agreement asked for on other studies scales with the quick head's own held-out Dice: a head
    at 0.03 (the RV blood pool of a held-out-structure fold) asks for almost none, a good head for
    half of its Dice."""
    share = RefineConfig().min_agreement
    assert agreement_needed(0.03, share) < 0.02
    assert agreement_needed(0.8, share) == 0.4
    assert agreement_needed(-1.0, share) == 0.0  # no held-out score: no bar from the head


def _cmr(shared: Path, i: int, value: int) -> tuple[torch.Tensor, torch.Tensor]:
    stack, geom = to_slices(read_image(shared / "cmr_bssfp" / f"image_{i}.nii.gz"), 160)
    return stack, label_slices(read_image(shared / "cmr_bssfp" / f"label_{i}.nii.gz"), geom, 160) == value


def test_core_refinement_beats_the_quick_head_on_the_held_out_study_and_resumes_from_its_state(shared):
    """The shipped model refined on two cardiac studies: its Dice on the held-out one rises above the
    quick head's (adapted on the other), and a run built from `state_dict()` continues where the first
    stopped."""
    torch.manual_seed(0)
    (s1, m1), (s2, m2) = _cmr(shared, 5, 600), _cmr(shared, 12, 600)
    adapter = SegAdapter(load_model(None), "cpu")
    head = adapter.adapt([s1, s2], [m1, m2])
    run = Refinement(adapter, [s1, s2], [m1, m2], head, RefineConfig(val_every=10))
    start = run.best
    published = [r for r in (run.advance() for _ in range(40)) if r is not None and r[1]]
    assert published and run.best > start, f"no candidate beat the quick head ({start:.3f})"
    again = Refinement(adapter, [s1, s2], [m1, m2], head, RefineConfig(val_every=10), state=run.state_dict())
    assert again.steps == run.steps
    assert again.score(again.adapter, again.head()) == run.score(run.adapter, run.head())


def test_the_guard_judges_the_quick_head_alike_on_cached_embeddings(shared):
    """The app hands the guard the embeddings it cached from inference and active-learning scoring
    (the support's and the anchors', in half precision): the bar a candidate must beat and the quick
    head's predictions on the anchors are those of embedding the studies afresh in full precision."""
    (s1, m1), (s2, m2), (s3, _) = _cmr(shared, 5, 600), _cmr(shared, 12, 600), _cmr(shared, 20, 600)
    adapter = SegAdapter(load_model(None), "cpu")
    head = adapter.adapt([s1], [m1])
    fresh = Refinement(adapter, [s1, s2], [m1, m2], head, RefineConfig(), anchors=[s3])
    half = [adapter.embed(s).to(torch.float16) for s in (s1, s2, s3)]  # as the app caches them
    cached = Refinement(
        adapter, [s1, s2], [m1, m2], head, RefineConfig(), anchors=[s3], feats=half[:2], anchor_feats=half[2:]
    )
    assert abs(cached.baseline - fresh.baseline) < 0.01, (cached.baseline, fresh.baseline)
    assert pooled_dice([cached.anchors[0][1].float()], [fresh.anchors[0][1]]) > 0.99


def test_from_two_labels_two_starts_take_turns_under_one_guard_and_either_version_serves_alike(shared):
    """From two labelled studies the run from the meta-learned weights and the run from fresh weights
    share the seconds and one guard: a candidate of either must beat the best of both so far and
    agree with the quick head on the anchors; only the warm run is distilled (never from two labels).
    The warm run trains alone until its first validation (the first version can go live as soon as
    with one run), then the fresh run starts and the seconds are shared equally until both runs have
    been validated, then the run whose held-out Dice leads at equal compute gets `lead` of them.
    Whichever passes is an encoder and a head that the app serves like any refined version; the pair
    resumes from its state, a single run's state continues the warm run, and with one label (or
    `fresh=0`) the app runs the warm start alone."""
    torch.manual_seed(0)
    (s1, m1), (s2, m2), (s3, _) = _cmr(shared, 5, 600), _cmr(shared, 12, 600), _cmr(shared, 20, 600)
    adapter = SegAdapter(load_model(None), "cpu")
    quick = adapter.adapt([s1, s2], [m1, m2])
    cfg = RefineConfig(val_every=4)
    one = adapter.adapt([s1], [m1])
    assert isinstance(start_refinement(adapter, [s1], [m1], one, cfg, anchors=[s3]), Refinement)
    assert isinstance(start_refinement(adapter, [s1], [m1], one, RefineConfig(fresh=1)), TwoStartRefinement)
    run = start_refinement(adapter, [s1, s2], [m1, m2], quick, cfg, anchors=[s3])
    assert isinstance(run, TwoStartRefinement) and run.fresh is None and set(run.runs) == {"warm"}
    meta = adapter.model.encoder.net.state_dict()
    assert all(torch.equal(v, run.warm.encoder_state()[k]) for k, v in meta.items())
    starts, published = set(), []

    def advance(n: int) -> None:
        for _ in range(n):
            result = run.advance()
            starts.add(run.start)
            if result is not None and result[1]:
                published.append((result[0], run.encoder_state(), run.head()))

    while not run.warm.history:  # the warm run alone until its first validation
        advance(1)
    assert starts == {"warm"} and run.warm.steps == cfg.val_every and run.fresh is None
    advance(1)  # then the fresh run starts, behind in seconds: it takes the step
    assert run.start == "fresh" and run.fresh.steps == 1 and run.warm.steps == cfg.val_every
    assert run.fresh.anchors is run.warm.anchors and run.fresh.baseline == run.warm.baseline
    assert run.fresh.best == run.warm.best  # one bar for both from the start
    fresh = run.fresh.encoder_state()
    assert any(not torch.equal(v, fresh[k]) for k, v in meta.items() if v.is_floating_point())
    while min(r.top for r in run.runs.values()) < 0:  # until both have been validated: equal shares
        behind = min(run.runs.values(), key=lambda r: r.seconds)
        advance(1)
        assert run.last is behind, "equal shares: the run behind in seconds trains"
    assert starts == {"warm", "fresh"} and run.warm.steps and run.fresh.steps
    leader, trailer = sorted(run.runs.values(), key=lambda r: r.top, reverse=True)
    assert leader.top > trailer.top and run.share(leader) == cfg.lead and run.share(trailer) == 1 - cfg.lead
    before = {id(r): r.seconds for r in run.runs.values()}
    advance(16)
    gained = {id(r): r.seconds - before[id(r)] for r in run.runs.values()}
    if run.share(leader) == cfg.lead:  # still leading: it got most of the seconds since
        assert gained[id(leader)] > 1.5 * gained[id(trailer)], gained
    assert run.warm.best == run.fresh.best == run.best  # one bar for both
    vals = [v for v, _, _ in published]
    assert all(b >= a + cfg.min_gain for a, b in zip(vals, vals[1:]))
    if published:  # the last passing candidate, as the app serves it: its own encoder and head
        _, encoder, head = published[-1]
        assert refined_adapter(adapter, encoder).predict(s3, [head])[0].shape == s3.shape

    again = start_refinement(adapter, [s1, s2], [m1, m2], quick, cfg, state=run.state_dict(), anchors=[s3])
    assert (again.warm.steps, again.fresh.steps) == (run.warm.steps, run.fresh.steps)
    assert all(torch.equal(v, run.fresh.encoder_state()[k]) for k, v in again.fresh.encoder_state().items())
    single = start_refinement(adapter, [s1, s2], [m1, m2], quick, cfg, state=run.warm.state_dict())
    assert single.warm.steps == run.warm.steps and single.fresh is None
    alone = start_refinement(adapter, [s1, s2], [m1, m2], quick, RefineConfig(fresh=0), state=run.state_dict())
    assert isinstance(alone, Refinement) and alone.steps == run.warm.steps

    # the lead goes to the start ahead at equal compute, not to the one with the best Dice so far: a
    # fresh start at 0.65 after 10 s leads a warm one that had 0.60 after 10 s and 0.70 after 30 s
    run.warm.history, run.warm.seconds = [(10.0, 0.60), (30.0, 0.70)], 30.0
    run.fresh.history, run.fresh.seconds = [(10.0, 0.65)], 10.0
    assert run.share(run.fresh) == cfg.lead and run.share(run.warm) == 1 - cfg.lead
    run.warm.history = [(10.0, 0.66), (30.0, 0.70)]
    assert run.share(run.warm) == cfg.lead and run.share(run.fresh) == 1 - cfg.lead


def test_refinement_trains_in_bfloat16_only_where_native_and_keeps_its_weights_in_float32():
    """A training step's forward pass runs in bfloat16 where the hardware does it (about half the
    step on such CPUs), and `bf16=0` turns it off; the weights a refined version is saved from stay
    float32 either way, so versions load as before."""
    conv = torch.nn.Conv2d(1, 1, 3)
    x = torch.randn(1, 1, 8, 8)
    with training_autocast("cpu", enabled=True):
        on = conv(x).dtype
    with training_autocast("cpu", enabled=False):
        off = conv(x).dtype
    assert on == (torch.bfloat16 if bf16_native("cpu") else torch.float32) and off == torch.float32
    stack, disk = _noisy_disk()
    adapter = SegAdapter(load_model(None), "cpu")
    run = Refinement(adapter, [stack], [disk], adapter.adapt([stack], [disk]), RefineConfig(augment=0.0))
    before = run.encoder_state()
    for _ in range(2):
        assert np.isfinite(run.step())
    after = run.encoder_state()
    assert all(v.dtype == before[k].dtype for k, v in after.items())
    assert all(v.dtype == torch.float32 for v in run.head().params.values())
    assert any(not torch.equal(v, before[k]) for k, v in after.items() if v.is_floating_point())


def _noisy_disk() -> tuple[torch.Tensor, torch.Tensor]:
    """(6 noisy slices, their disk mask): a study small enough for a few training steps in a test."""
    yy, xx = torch.meshgrid(torch.arange(160), torch.arange(160), indexing="ij")
    disk = ((yy - 80) ** 2 + (xx - 70) ** 2 < 20**2).expand(6, 160, 160)
    return disk.float() + 0.1 * torch.randn(6, 160, 160), disk


def test_with_a_moving_average_the_average_is_published_and_survives_a_restart():
    """With `ema` the guard judges and publishes an average that trails the trained weights, so the
    noise of the last step is not what goes live; a run continued from `state_dict()` publishes the
    same average, and without `ema` the trained weights themselves are published."""
    torch.manual_seed(0)
    stack, disk = _noisy_disk()
    adapter = SegAdapter(load_model(None), "cpu")
    head = adapter.adapt([stack], [disk])
    runs = {e: Refinement(adapter, [stack], [disk], head, RefineConfig(augment=0.0, ema=e)) for e in (0.0, 0.9)}
    start = runs[0.9].encoder_state()
    for run in runs.values():
        for _ in range(3):
            run.step()
    trained = {k: v.detach() for k, v in runs[0.9].model.encoder.net.state_dict().items()}
    average = runs[0.9].encoder_state()
    keys = [k for k, v in start.items() if v.is_floating_point()]

    def moved(w: dict) -> float:
        return sum(float((w[k] - start[k]).norm() ** 2) for k in keys) ** 0.5

    assert 0 < moved(average) < moved(trained)
    plain = runs[0.0]
    assert all(torch.equal(v, plain.model.encoder.net.state_dict()[k]) for k, v in plain.encoder_state().items())
    again = Refinement(adapter, [stack], [disk], head, RefineConfig(augment=0.0, ema=0.9), state=runs[0.9].state_dict())
    assert all(torch.equal(again.encoder_state()[k], average[k]) for k in keys)
    assert all(torch.equal(v, runs[0.9].head().params[k]) for k, v in again.head().params.items())


def test_a_fresh_start_on_the_light_network_is_served_and_reloaded_like_any_version(tmp_path):
    """With `fresh_emb` the fresh run trains the light network; its version's weights, saved as the app
    saves them and loaded without pickles, rebuild that network for serving, and its state resumes."""
    torch.manual_seed(0)
    (s1, m1), (s2, m2) = _noisy_disk(), _noisy_disk()
    adapter = SegAdapter(load_model(None), "cpu")
    cfg = RefineConfig(augment=0.0, fresh_emb=8, val_every=2)
    run = start_refinement(adapter, [s1, s2], [m1, m2], adapter.adapt([s1, s2], [m1, m2]), cfg)
    run.start_fresh()
    for _ in range(2):
        run.fresh.step()
    assert run.fresh.model.cfg.backbone == "unet" and run.warm.model.cfg.backbone == "basicunet"
    path = tmp_path / "v0002.encoder.pt"
    torch.save(run.fresh.encoder_state(), path)
    served = refined_adapter(adapter, torch.load(path, weights_only=True))
    assert (served.model.cfg.backbone, served.model.cfg.emb) == ("unet", 8)
    assert served.predict(s1, [run.fresh.head()])[0].shape == s1.shape
    again = start_refinement(adapter, [s1, s2], [m1, m2], run.warm.head(), cfg, state=run.state_dict())
    assert again.fresh.steps == 2 and all(
        torch.equal(v, again.fresh.encoder_state()[k]) for k, v in run.fresh.encoder_state().items()
    )
    other = start_refinement(adapter, [s1, s2], [m1, m2], run.warm.head(), RefineConfig(), state=run.state_dict())
    assert other.fresh.steps == 0 and other.warm.steps == run.warm.steps, (
        "a state of another fresh network starts afresh"
    )
    rng = torch.random.get_rng_state()
    assert fresh_adapter(adapter, 3, 8).model.cfg.emb == 8 and torch.equal(rng, torch.random.get_rng_state())
    with pytest.raises(RuntimeError):  # weights of neither network are refused, not served half-loaded
        refined_adapter(adapter, {"conv.weight": torch.zeros(4, 3, 3, 3), "conv.bias": torch.zeros(4)})


def test_the_simulated_annotator_refines_on_from_its_last_run_after_each_save():
    """`served_after` with a carry, as the annotator loop of `evaluate clicks` calls it after each save:
    the run over two labels goes on from the run over the first, as the app's refinement does."""
    torch.manual_seed(0)
    (s1, m1), (s2, m2) = _noisy_disk(), _noisy_disk()
    adapter = SegAdapter(load_model(None), "cpu")
    cfg, carry = RefineConfig(augment=0.0, val_every=2), {}
    served_after(adapter, [s1], [m1], adapter.adapt([s1], [m1]), 1.0, cfg, carry=carry)
    first = carry["state"]["steps"]
    assert first > 0
    # given no time of its own, the run over two labels still holds the steps of the run before it
    served_after(adapter, [s1, s2], [m1, m2], adapter.adapt([s1, s2], [m1, m2]), 0.0, cfg, carry=carry)
    assert carry["state"]["warm"]["steps"] == first, "the warm run continued from the first label's run"


class _RunHeldMidStep:
    """A run whose first step finds a better candidate while an administrator rolls the structure back."""

    start = "warm"

    def __init__(self, worker, name: str) -> None:
        self.worker, self.name = worker, name
        self.seconds, self.steps, self.best, self.baseline, self.plateau = 0.0, 0, 0.5, 0.4, False
        self.stacks = [torch.zeros(1)]

    def advance(self):
        self.worker.hold(self.name)  # the rollback lands while the step runs
        self.seconds, self.steps, self.best = 1.0, 1, 0.9
        return 0.9, True

    def head(self):
        return "candidate head"

    def encoder_state(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"steps": self.steps}


class _Worker(RefinementWorker):
    def __init__(self, folder: Path) -> None:
        super().__init__(service=None, folder=folder)
        self.published: list = []

    def _prepare(self, name: str):
        return _RunHeldMidStep(self, name), ["study"], 0.0

    def _publish(self, name, run, head, encoder, val) -> None:
        self.published.append((name, head, val))


def test_a_rollback_during_a_refinement_step_holds_the_structure_and_publishes_nothing(tmp_path):
    """The worker's own loop: the candidate of a step interrupted by a rollback never goes live, and
    the status stays 'held after rollback' instead of the step's 'refining', and what the step learned
    is kept for the structure's next label."""
    worker = _Worker(tmp_path)
    worker._run("lv blood pool")
    assert worker.published == []
    assert worker.status()["lv blood pool"]["state"] == HELD
    assert torch.load(tmp_path / "lv_blood_pool" / "state.pt", weights_only=True)["run"] == {"steps": 1}
