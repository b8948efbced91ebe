"""Site adaptation: the encoder keeps meta-training on the site's images; a guard decides what goes live.

Core (no server): resumable steps, the prior centred on the starting weights, the guard's two metrics.
Through `MONAILabelClient` against a real `metaapp serve`: the idle loop makes a candidate, checks it and
swaps it in (head versions bump, inference answers throughout) or keeps the live encoder; a restart
resumes; rollback; the conf key turns it off.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from monailabel.client import MONAILabelClient

from monailabel_metaapp.cli import main
from monailabel_metaapp.core.checkpoint import DEFAULT_SEG_WEIGHTS, load_model
from monailabel_metaapp.core.episodes import load_studies
from monailabel_metaapp.core.site_adaptation import SiteAdaptation, SiteConfig, split_holdout

CFG = dict(tasks_per_step=1, val_tasks=4, checkpoint_seconds=1e9)


@pytest.fixture(scope="module")
def brain_studies(samples_src):
    return load_studies([samples_src], 160, progress=False)


def _encoder_delta(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pairs = zip(a.encoder.net.parameters(), b.encoder.net.parameters())
    return sum(float((p - q).detach().abs().sum()) for p, q in pairs)


def test_holdout_keeps_labelled_and_unlabelled_images_out_of_training(brain_studies):
    train, held = split_holdout(brain_studies, 0.125)
    assert {s.name for s in held}.isdisjoint(s.name for s in train)
    assert sum(s.label is not None for s in held) == 1 and sum(s.label is None for s in held) == 1
    again, held2 = split_holdout(list(reversed(brain_studies)), 0.125)
    assert [s.name for s in held2] == [s.name for s in held]  # by name, not by order
    with pytest.raises(ValueError, match="at least 2 images"):
        split_holdout(brain_studies[:1], 0.125)


def test_steps_resume_from_checkpoint_and_prior_stays_on_the_start(brain_studies, tmp_path):
    state = tmp_path / "state.pt"
    site = SiteAdaptation(brain_studies, None, state, SiteConfig(**CFG), "cpu")
    live = load_model(None)
    live.encoder.set_prior_to_current()
    kl_site, kl_live = site.model.encoder.kl().detach().item(), live.encoder.kl().detach().item()
    assert kl_site == pytest.approx(kl_live, rel=1e-5)  # mean: no term
    for _ in range(2):
        rec = site.step()
    assert rec["step"] == 2 and site.elapsed > 0
    assert _encoder_delta(site.model, live) > 0
    site.checkpoint()

    again = SiteAdaptation(brain_studies, None, state, SiteConfig(**CFG), "cpu")
    assert again.resumed and again.steps == 2 and again.elapsed == pytest.approx(site.elapsed)
    assert _encoder_delta(again.model, site.model) == 0
    for n, p in live.encoder.net.named_parameters():  # the prior is the start, not the resumed weights
        key = n.replace(".", "__")
        assert torch.equal(getattr(again.model.encoder, f"prior_mean__{key}"), p)
    with pytest.raises(ValueError, match="continues site adaptation from shipped"):
        SiteAdaptation(brain_studies, str(DEFAULT_SEG_WEIGHTS), state, SiteConfig(**CFG), "cpu")


def test_task_by_task_makes_the_batch_update_in_pieces(brain_studies, tmp_path):
    """The server builds an update of 4 tasks one task per call (it yields between them): the result is the
    update the offline run makes in one call, and nothing moves until the batch's last task is in."""
    cfg = dict(CFG, tasks_per_step=4)
    whole = SiteAdaptation(brain_studies, None, tmp_path / "w.pt", SiteConfig(**cfg), "cpu")
    pieces = SiteAdaptation(brain_studies, None, tmp_path / "p.pt", SiteConfig(**cfg, task_by_task=True), "cpu")
    episodes = whole.draw(4)
    whole.draw = lambda n: episodes[:n]
    queue = list(episodes)
    pieces.draw = lambda n: [queue.pop(0) for _ in range(n)]
    torch.manual_seed(0)
    whole.step()
    start = {k: v.clone() for k, v in pieces.model.state_dict().items()}
    torch.manual_seed(0)
    for i in range(4):
        rec = pieces.step()
        if i < 3:
            assert rec["step"] == 0 and pieces.pending == i + 1
            assert all(torch.equal(v, start[k]) for k, v in pieces.model.state_dict().items())
    assert rec["step"] == 1 and pieces.pending == 0 and not queue
    moved = _encoder_delta(whole.model, load_model(None))
    assert moved > 0 and _encoder_delta(pieces.model, whole.model) < 1e-4 * moved


def test_guard_scores_both_encoders_and_applies_the_margin(brain_studies, tmp_path):
    site = SiteAdaptation(brain_studies, None, tmp_path / "s.pt", SiteConfig(**CFG), "cpu")
    live = load_model(None)
    site.step()
    rec = site.check(site.candidate(), live)
    assert rec["metric"] == "dice"  # a held-out labelled study: leave-one-study-out Dice
    assert set(rec["per_structure"]) == {"sample_studies:1", "sample_studies:2", "sample_studies:3"}
    assert 0 < rec["live"] < 1 and 0 < rec["candidate"] < 1
    assert rec["accepted"] == (rec["candidate"] > rec["live"])

    unlabelled = [s for s in brain_studies if s.label is None]
    ssl = SiteAdaptation(unlabelled, None, tmp_path / "u.pt", SiteConfig(**CFG), "cpu")
    rec = ssl.check(live, live)  # no labels: the self-supervised validation loss, lower is better
    assert rec["metric"] == "ssl_loss" and rec["candidate"] == rec["live"] > 0
    assert not rec["accepted"]  # not better than itself
    ssl.cfg.margin = -1.0
    assert ssl.check(live, live)["accepted"]  # within a margin of -1, equal passes


def test_bank_sampler_steps_draw_its_kinds_and_reuse_superpixels(brain_studies, tmp_path):
    cfg = SiteConfig(**CFG, sampler="bank", task_shares={"superpixel_slices": 6})
    site = SiteAdaptation(brain_studies, None, tmp_path / "b.pt", cfg, "cpu")
    episodes = site.draw(24)
    kinds = {e.structure for e in episodes}
    assert kinds <= {"labelled", "merge", "superpixel"} and {"labelled", "superpixel"} <= kinds
    for e in episodes:  # every support holds its structure, and the query has the support's channels
        assert e.y_support.sum() > 0 and e.x_query.shape[1:] == e.x_support.shape[1:]
    held = {s.name for s in site.held}
    for s in brain_studies:  # 6 slices of each training image got superpixels, kept on it; held-out ones none
        kept = s.superpixels_at.get((60, 6))
        assert (kept is None) == (s.name in held)
        if kept is not None:
            idx, maps = kept
            assert len(set(idx.tolist())) == 6 and maps.shape == (6, *s.image.shape[1:]) and maps.any()
    cached = {s.name: s.superpixels_at[(60, 6)] for s in brain_studies if s.name not in held}
    site.set_data(brain_studies)  # a datastore that grew: the maps computed once are reused
    assert all(s.superpixels_at[(60, 6)] is cached[s.name] for s in brain_studies if s.name in cached)
    assert site.step()["step"] == 1

    with pytest.raises(ValueError, match="use ssl_task 'superpixel'"):
        SiteAdaptation(brain_studies, None, tmp_path / "v.pt", SiteConfig(**CFG, sampler="bank", ssl_task="supervoxel"))


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """`metaapp adapt-site ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        main(["adapt-site", *args])
        rc = 0
    except SystemExit as e:
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_adapt_site_cli_refuses_bad_input(capsys, tmp_path):
    o = str(tmp_path / "o.pt")
    rc, _, err = _cli(capsys, "--studies", str(tmp_path / "nope"), "--minutes", "1", "--out", o)
    assert rc == 2 and "no such studies folder" in err
    rc, _, err = _cli(capsys, "--studies", str(tmp_path), "--minutes", "0", "--out", o)
    assert rc == 2 and "--minutes must be > 0" in err
    rc, _, err = _cli(capsys, "--studies", str(tmp_path), "--minutes", "1", "--out", o, "--init", "x.pt")
    assert rc == 2 and "no such weights file" in err
    rc, _, err = _cli(capsys, "--studies", str(tmp_path), "--minutes", "1", "--out", o)
    assert rc == 2 and "no images found" in err
    rc, _, err = _cli(
        capsys, "--task", "cls", "--studies", str(tmp_path), "--minutes", "1", "--out", o, "--sampler", "bank"
    )
    assert rc == 2 and "--sampler and --task-shares are for --task seg" in err
    bank = ["--studies", str(tmp_path), "--minutes", "1", "--out", o, "--sampler", "bank"]
    rc, _, err = _cli(capsys, *bank, "--task-shares", "merge")
    assert rc == 2 and "--task-shares takes KEY=VALUE" in err
    rc, _, err = _cli(capsys, *bank, "--ssl-task", "supervoxel")
    assert rc == 2 and "leave --ssl-task at superpixel" in err
    rc, _, err = _cli(capsys, "--studies", str(tmp_path), "--minutes", "1", "--out", o, "--task-shares", "merge=0")
    assert rc == 2 and "add --sampler bank" in err


def test_adapt_site_cli_writes_the_guarded_encoder(capsys, samples_src, tmp_path):
    site = tmp_path / "site"  # three unlabelled images: the guard uses the self-supervised loss
    site.mkdir()
    for name in ("mni_03.nii.gz", "mni_04.nrrd", "mni_05.nii.gz"):
        (site / name).symlink_to(samples_src / name)
    out = tmp_path / "site.pt"
    args = ["--studies", str(site), "--minutes", "0.05", "--out", str(out), "--device", "cpu", "--margin", "10"]
    rc, stdout, err = _cli(capsys, *args)
    assert rc == 0, err[-2000:]
    summary = json.loads(stdout[stdout.index("{") :])
    assert not summary["accepted"]  # a loss 10 lower cannot be met: the starting weights are kept
    kept = torch.load(out, weights_only=True)
    assert all(torch.equal(kept[k], v) for k, v in torch.load(DEFAULT_SEG_WEIGHTS, weights_only=True).items())
    side = json.loads(Path(str(out) + ".json").read_text())["site_adaptation"]
    assert side["checks"][-1]["metric"] == "ssl_loss" and side["accepted"] is False
    assert side["checks"][-1]["candidate"] > 0 and side["checks"][-1]["live"] > 0
    assert Path(summary["candidate"]).exists() and Path(str(out) + ".state.pt").exists()
    load_model(summary["candidate"])  # a loadable model, like OUT


# -- through the server ------------------------------------------------------------------------

FAST = {"site_check_minutes": "0.05", "refine": "false", "site_adapt_cls": "false"}  # the classifier's: its own test


def _site(client: MONAILabelClient) -> dict:
    return client.info()["metaapp"]["fewshot_seg"]["site_adaptation"]


def _heads(client: MONAILabelClient) -> dict[str, int]:
    return {n: r["version"] for n, r in client.info()["metaapp"]["fewshot_seg"]["structures"].items()}


def _wait(client: MONAILabelClient, until, timeout: float = 240) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = _site(client)
        if until(st):
            return st
        time.sleep(0.5)
    raise AssertionError(f"site adaptation did not get there in {timeout} s: {st}")


def test_idle_loop_swaps_in_a_better_encoder_resumes_after_restart_and_rolls_back(sample_store, start_server, tmp_path):
    # a margin of -10 accepts; the classic sampler here, the default (bank) after the restart
    conf = {**FAST, "site_adapt": "true", "site_adapt_minutes": "0.05", "site_margin": "-10", "site_sampler": "classic"}
    server = start_server(sample_store, conf)
    server.wait_ready()
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    before = _heads(client)
    assert min(before.values()) >= 1

    answers, errors, stop = [], [], threading.Event()

    def infer_all_along():
        while not stop.is_set():
            try:
                _, params = client.infer("fewshot_seg", "mni_04", {})
                answers.append((_site(client)["state"], params["head_versions"]))
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(e))
            stop.wait(1.5)  # an annotator looks at the result; site adaptation gets the quiet moments

    t = threading.Thread(target=infer_all_along)
    t.start()
    try:
        st = _wait(client, lambda s: s["version"] == 1)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert len(answers) >= 2 and {"training", "checking", "paused"} & {s for s, _ in answers}
    check = st["last_check"]
    assert check["accepted"] and check["metric"] == "dice" and "candidate" in check and "live" in check
    after = _heads(client)
    assert all(after[n] > before[n] for n in before), (before, after)
    assert st["minutes"] > 0 and (sample_store / ".metaapp" / "site" / "encoders" / "v0001.pt").exists()
    info = client.info()["metaapp"]["fewshot_seg"]
    assert info["model"].endswith("v0001.pt")
    _wait(client, lambda s: s["state"] == "idle")  # the cap is reached
    trained = _site(client)["trained_minutes"]
    server.stop()

    # restart: the live encoder stays v1, training resumes from the checkpoint (now with the default, the
    # bank sampler's tasks); a margin of 10 refuses
    # the cap is checked between updates, so the first run may overshoot its 0.05 min: the new cap is
    # counted from what it trained
    conf.update(site_adapt_minutes=f"{trained + 0.05:.2f}", site_margin="10")
    del conf["site_sampler"]
    server = start_server(sample_store, conf)
    server.wait_ready()
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    assert client.info()["metaapp"]["fewshot_seg"]["model"].endswith("v0001.pt")
    st = _wait(client, lambda s: (s["last_check"] or {}).get("live_version") == 1 and s["state"] == "idle")
    assert st["trained_minutes"] > trained
    assert st["resumed_at_step"] and st["resumed_at_step"] < st["steps"]
    assert st["version"] == 1 and not st["last_check"]["accepted"]  # kept the live one
    heads = _heads(client)

    r = requests.post(f"{server.url}/metaapp/site/rollback", timeout=120)
    assert r.status_code == 200 and r.json()["version"] == 0
    assert client.info()["metaapp"]["fewshot_seg"]["model"] == str(DEFAULT_SEG_WEIGHTS)
    assert all(v > heads[n] for n, v in _heads(client).items())
    r = requests.post(f"{server.url}/metaapp/site/rollback", timeout=30)
    assert r.status_code == 409  # nothing before version 0


def test_conf_key_turns_site_adaptation_off(sample_store, start_server, tmp_path):
    server = start_server(sample_store, {"refine": "false"})  # conftest: site_adapt false
    server.wait_ready()
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    time.sleep(2)
    st = _site(client)
    assert st["state"] == "off" and st["version"] == 0 and st["last_check"] is None
    assert client.info()["metaapp"]["fewshot_cls"]["site_adaptation"]["state"] == "off"  # both encoders
    assert not (sample_store / ".metaapp" / "site").exists()
