"""Core meta-learning behaviour: inner loop, KL term, task sampling, a meta-train smoke run."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from monailabel_metaapp.core.adaptation import SegAdapter
from monailabel_metaapp.core.checkpoint import load_model, sidecar
from monailabel_metaapp.core.clicks import (
    Click,
    Corrections,
    apply_clicks,
    crop_saved,
    keep_clicked,
    saved_slices,
    window,
)
from monailabel_metaapp.core.episodes import EpisodeSampler, Study, load_studies
from monailabel_metaapp.core.inner_loop import inner_adapt, seg_loss
from monailabel_metaapp.core.metatrain import MetaTrainConfig, best_weights_path, meta_train
from monailabel_metaapp.core.networks import FewShotSegModel, SegModelConfig
from monailabel_metaapp.core.objective import meta_objective
from monailabel_metaapp.core.variational import gaussian_kl
from monailabel_metaapp.core.volume import to_slices

SMALL = SegModelConfig(size=64, features=(8, 8, 16, 16, 32, 8), emb=8)


def _toy_task(n=2, size=64):
    x = torch.rand(n, 3, size, size)
    y = torch.zeros(n, size, size)
    y[:, 20:40, 20:40] = 1
    x[:, :, 20:40, 20:40] += 1.0
    return x, y


def test_inner_loop_changes_only_task_specific_parameters():
    torch.manual_seed(0)
    model = FewShotSegModel(SMALL)
    x, y = _toy_task()
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    feats = model.embed(x)
    p0 = model.head.init_params(feats, y)
    p1 = inner_adapt(model.head, p0, model.lrs(), feats, y, steps=3)
    assert set(p1) == set(dict(model.head.named_parameters()))
    assert any(not torch.equal(p0[k], p1[k]) for k in p0), "the head did not move"
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), f"encoder tensor {k} changed in the inner loop"
    # the adapted head fits the support better than its initialisation
    assert seg_loss(model.head.logits(feats, p1), y) < seg_loss(model.head.logits(feats, p0), y)


def test_adaptation_and_prediction_run_concurrently_on_one_model():
    """The app adapts in one thread while inference and scoring predict in others, on the same head."""
    import threading

    torch.manual_seed(0)
    adapter = SegAdapter(FewShotSegModel(SMALL), steps=5)
    x, y = _toy_task(4)
    stack = x[:, 1]
    head = adapter.adapt([stack], [y > 0])
    errors: list[BaseException] = []

    def run(fn):
        try:
            for _ in range(15):
                fn()
        except BaseException as e:  # noqa: BLE001 - any failure in a thread fails the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(lambda: adapter.adapt([stack], [y > 0]),))]
    threads += [threading.Thread(target=run, args=(lambda: adapter.predict(stack, [head]),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_learned_rates_and_encoder_receive_meta_gradients():
    torch.manual_seed(0)
    model = FewShotSegModel(SMALL)
    from monailabel_metaapp.core.episodes import Episode

    x, y = _toy_task(3)
    ep = Episode(x[:1], y[:1], x[1:], y[1:], "toy")
    loss, _ = meta_objective(model, [ep], lambda_kl=1e-3, inner_steps=2)
    loss.backward()
    for name, p in model.log_lr.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"learned rate {name} got no gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.log_sigma.values())
    assert model.encoder.net.conv_0.conv_0.conv.weight.grad.abs().sum() > 0


def test_the_head_on_a_window_matches_the_whole_slice_inside_it():
    """Click corrections run the head on the box around the pixels they need: inside it the values
    must be those of the whole slice (the head's 3x3 convolution sees the same neighbours)."""
    torch.manual_seed(0)
    model = FewShotSegModel(SMALL)
    feats = torch.randn(3, SMALL.emb, 64, 64)
    params = {k: v + 0.1 * torch.randn_like(v) for k, v in model.head.init_params(feats, feats[:, 0] > 0.5).items()}
    whole = model.head.logits(feats, params)
    for box in ((slice(10, 20), slice(30, 41)), (slice(0, 5), slice(60, 64))):  # inside, and at the image's corner
        mask = torch.zeros(3, 64, 64, dtype=torch.bool)
        mask[1][box] = True
        ys, xs = window(mask)
        part = model.head.logits(feats[..., ys, xs], params)
        assert torch.allclose(part[:, mask[1, ys, xs]], whole[:, mask[1]], atol=1e-5)
    assert window(torch.zeros(2, 8, 8, dtype=torch.bool)) == (slice(0, 0), slice(0, 0))


def test_a_foreground_click_apart_from_the_structure_never_drops_its_body():
    """A one-piece structure keeps its largest piece and each piece holding a foreground click, even
    when the click lies apart from the body; stray pieces go. A structure in pieces keeps them all."""
    mask = np.zeros((6, 20, 20), bool)
    mask[1:5, 2:10, 2:10] = True  # the body
    mask[2, 15:17, 15:17] = True  # a stray piece
    out = keep_clicked(mask, [(3, 18, 3)], one_piece=True)  # a click on an empty voxel far from both
    assert out[1:5, 2:10, 2:10].all() and out[3, 18, 3] and not out[2, 15:17, 15:17].any()
    assert int(out.sum()) == 4 * 8 * 8 + 1
    out = keep_clicked(mask, [(2, 15, 15)], one_piece=True)  # a click on the stray piece keeps it
    assert out[2, 15:17, 15:17].all() and out[1:5, 2:10, 2:10].all()
    assert keep_clicked(mask, [], one_piece=True).sum() == 4 * 8 * 8
    assert keep_clicked(mask, [], one_piece=False).sum() == mask.sum()


def test_saved_labels_are_cut_to_the_structure_and_its_surroundings():
    """A correction fits the saved labels in one box: every pixel of the structure stays in it, with
    the margin around it (clipped at the border), and features and masks are cut alike."""
    masks = torch.zeros(3, 100, 100, dtype=torch.bool)
    masks[0, 40:50, 30:35] = True
    masks[1, 45:60, 32:40] = True  # slice 2 has no structure: a background slice of the support
    feats = torch.arange(3 * 2 * 100 * 100, dtype=torch.float32).reshape(3, 2, 100, 100)
    f, m = crop_saved(feats, masks, margin=0.1)
    assert m.shape == (3, 40, 30) and f.shape == (3, 2, 40, 30)  # rows 30-69, columns 20-49
    assert int(m.sum()) == int(masks.sum())
    assert torch.equal(f, feats[..., 30:70, 20:50])
    masks[0, 95:, :3] = True  # near a corner: the box stops at the border
    f, m = crop_saved(feats, masks, margin=0.1)
    assert m.shape == (3, 70, 50) and int(m.sum()) == int(masks.sum())


def test_saved_slices_hold_the_structure_at_any_number_of_saved_labels():
    """The saved labels a correction keeps fitting must show the structure, however many there are:
    slices of it spread over its extent in every study, plus the slice where it ends."""
    adapter = SegAdapter(FewShotSegModel(SMALL))
    for k in (1, 3, 5):
        masks = []
        for n in range(k):
            m = torch.zeros(12, 16, 16, dtype=torch.bool)
            m[2 + n : 9 + n, 4:9, 4:9] = True
            masks.append(m)
        for m, picks in zip(masks, saved_slices(adapter, masks)):
            has = [bool(m[i].any()) for i in picks]
            assert sum(has) == min(7, max(2, 8 // k)) and has.count(False) == 1, (k, picks)  # 7: all it has


def test_kl_is_zero_when_posterior_equals_prior_and_grows_with_distance():
    mu = torch.zeros(100)
    sigma_p = 0.1
    log_sigma = torch.full((100,), math.log(sigma_p))
    assert gaussian_kl(mu, log_sigma, torch.zeros(100), sigma_p).sum().item() == pytest.approx(0.0, abs=1e-6)
    kls = [gaussian_kl(mu + d, log_sigma, torch.zeros(100), sigma_p).sum().item() for d in (0.01, 0.1, 0.5)]
    assert kls[0] < kls[1] < kls[2]
    # the model's KL obeys the same: centre the prior on the weights with matching sigma -> 0
    model = FewShotSegModel(SMALL)
    model.encoder.set_prior_to_current()
    for v in model.encoder.log_sigma.values():
        v.data.fill_(math.log(SMALL.prior_sigma))
    assert model.encoder.kl().item() == pytest.approx(0.0, abs=1e-6)


def test_task_sampling_on_a_real_datastore(cmr_readonly):
    studies = load_studies([cmr_readonly], 64, progress=False)
    assert len(studies) == 8 and all(s.label is not None for s in studies)
    assert sorted(studies[0].values()) == [200, 500, 600]  # int16 storage keeps 500 and 600 intact
    sampler = EpisodeSampler(studies, context=1, exclude={600}, ssl_fraction=0.0, seed=1)
    assert {v for _, v in sampler.by_value} == {200, 500}, "held-out structure must never be sampled"
    for _ in range(10):
        ep = sampler.sample()
        assert ep.structure in ("200", "500")
        assert ep.x_support.shape[1:] == (3, 64, 64) and ep.y_support.shape[1:] == (64, 64)
        assert ep.y_support.sum() > 0, "support slice must show the structure"
    ssl = EpisodeSampler(studies, context=1, ssl_fraction=1.0, seed=2).sample()
    assert ssl.structure == "superpixel" and 0 < ssl.y_support.mean() < 0.5


def test_supervoxel_task_queries_another_slice_of_the_same_region():
    """A supervoxel episode must show the encoder a different cut of the region than its support
    (else it teaches only augmentation invariance, as the superpixel task does), both non-empty."""
    g = torch.Generator().manual_seed(0)
    zz, yy, xx = torch.meshgrid(torch.arange(10), torch.arange(64), torch.arange(64), indexing="ij")
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    img = torch.where(r2 < 28**2, 90.0, 0.0)  # the body
    img[r2 < (6 + zz) ** 2] = 200.0  # a bright structure that grows from slice to slice
    img = (img + 8 * torch.randn(img.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    sampler = EpisodeSampler([Study("site/a", img, None)], context=1, seed=0, ssl_kind="supervoxel")
    assert sampler.ssl_fraction == 1.0
    slices: list[list[int]] = []
    orig = sampler._xy
    sampler._xy = lambda s, idx, m: slices.append(list(idx)) or orig(s, idx, m)
    for _ in range(10):
        slices.clear()
        ep = sampler.sample()
        (support, query) = slices
        assert ep.structure == "supervoxel" and not set(support) & set(query)
        assert all(0 < abs(q - support[0]) <= 3 for q in query)
        assert ep.x_query.shape[1:] == (3, 64, 64) and ep.y_support.sum() > 0
        assert (ep.y_query.flatten(1).sum(1) > 0).all(), "every query slice must show the region"
    with pytest.raises(ValueError, match="ssl_kind"):
        EpisodeSampler([Study("site/a", img, None)], ssl_kind="voxel")


def test_meta_train_smoke_lowers_loss_and_resumes(cmr_readonly, tmp_path):
    torch.manual_seed(0)
    studies = load_studies([cmr_readonly], 64, progress=False)
    out = tmp_path / "m.pt"
    cfg = MetaTrainConfig(
        minutes=5, max_steps=30, tasks_per_step=2, inner_steps=2, lr=3e-3, val_every=1000, checkpoint_seconds=1e9
    )
    meta_train(studies, out, cfg, SMALL, device="cpu", progress=False)
    log = [json.loads(line) for line in (tmp_path / "m.pt.log.jsonl").read_text().splitlines()]
    losses = [r["task_loss"] for r in log if "task_loss" in r]
    assert len(losses) == 30
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first, f"meta-training did not lower the task loss ({first:.3f} -> {last:.3f})"
    # weights are a plain state_dict that loads with weights_only=True and rebuilds the model
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert load_model(out).cfg.size == 64
    # the best-validated weights are kept beside the last ones, when they beat the starting weights
    best = best_weights_path(out)
    start, *later = [r["val_loss"] for r in log if "val_loss" in r]
    assert log[0]["step"] == 0 and later, "no validation of the starting weights, or none after training"
    assert best.exists() == (min(later) < start)
    if best.exists():
        assert json.loads(sidecar(best).read_text())["val_loss"] == pytest.approx(min(later), abs=1e-4)
        assert load_model(best).cfg.size == 64
    # resume continues from the saved step
    cfg.max_steps = 32
    summary = meta_train(studies, out, cfg, SMALL, device="cpu", progress=False)
    assert summary["steps"] == 32


def test_meta_train_runs_data_parallel_under_torchrun(cmr_readonly, tmp_path):
    """Two CPU processes (gloo) through torchrun, unchanged CLI: both stop together, rank 0 writes."""
    import subprocess
    import sys

    from monailabel_metaapp.core.episodes import save_bank

    bank = tmp_path / "bank.npz"
    save_bank(load_studies([cmr_readonly], 32, progress=False), bank)
    out = tmp_path / "ddp.pt"
    from monailabel_metaapp.devserver import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "monailabel_metaapp",
        "meta-train",
        "--studies",
        str(bank),
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--size",
        "32",
        "--device",
        "cpu",
        "--tasks-per-step",
        "1",
        "--inner-steps",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.exists() and json.loads((tmp_path / "ddp.pt.json").read_text())["steps"] == 3


def _click_study(arr: np.ndarray, seed: int):
    """(adapter, stack, geometry, embeddings) of a noisy synthetic study (1.5 x 1.5 x 5 mm voxels)
    under the shipped encoder: what a click correction works on."""
    img = sitk.GetImageFromArray(arr + 0.05 * np.random.default_rng(seed).standard_normal(arr.shape).astype(np.float32))
    img.SetSpacing((1.5, 1.5, 5.0))
    adapter = SegAdapter(load_model(None), "cpu")
    stack, geom = to_slices(img, adapter.size)
    return adapter, stack, geom, adapter.embed(stack)


def test_a_click_changes_the_label_only_near_itself_and_keeps_what_earlier_clicks_fixed():
    """Two look-alike bright disks far apart on one study: a foreground point on the first, then a
    background point on the second. The second correction may change the label only within reach of
    the second point; the first disk's label, which the first point fixed, stays as it was."""
    arr = np.zeros((24, 96, 96), np.float32)
    zz, yy, xx = np.mgrid[:24, :96, :96]
    arr[(np.abs(zz - 4) <= 2) & ((yy - 48) ** 2 + (xx - 48) ** 2 <= 100)] = 1.0  # disk A
    arr[(np.abs(zz - 19) <= 2) & ((yy - 48) ** 2 + (xx - 48) ** 2 <= 100)] = 1.0  # disk B, 75 mm away
    adapter, stack, geom, feats = _click_study(arr, seed=0)
    state = Corrections(start=None, saved=None, one_piece=False)
    first = apply_clicks(adapter, stack, geom, feats, state, [Click((48, 48, 4), True)])
    assert first[4, 48, 48]
    second = apply_clicks(adapter, stack, geom, feats, state, [Click((48, 48, 19), False)])
    assert np.array_equal(second[:12], first[:12]), "the label around the first point changed"
    assert not second[19, 48, 48]


def test_a_click_leaves_alone_what_lies_nearer_a_point_of_the_other_sign():
    """Two touching look-alike disks: a foreground point on the first takes in both, a background
    point cuts the second away. A foreground point where they touch must not bring back what lies
    nearer the background point than any foreground point: the annotator's nearest point says what
    a voxel is."""
    arr = np.zeros((24, 96, 96), np.float32)
    zz, yy, xx = np.mgrid[:24, :96, :96]
    slab = np.abs(zz - 12) <= 4
    arr[slab & ((yy - 48) ** 2 + (xx - 40) ** 2 <= 100)] = 1.0  # the structure
    arr[slab & ((yy - 48) ** 2 + (xx - 54) ** 2 <= 100)] = 1.0  # a look-alike touching it
    adapter, stack, geom, feats = _click_study(arr, seed=2)
    state = Corrections(start=None, saved=None, one_piece=False)
    fg1, bg, fg2 = Click((38, 48, 12), True), Click((56, 48, 12), False), Click((46, 52, 13), True)
    assert apply_clicks(adapter, stack, geom, feats, state, [fg1])[12, 48, 56], "the look-alike was not taken in"
    cut = apply_clicks(adapter, stack, geom, feats, state, [bg])
    after = apply_clicks(adapter, stack, geom, feats, state, [fg2])

    def mm_from(c: Click) -> np.ndarray:  # distance of every voxel from a point (5 x 1.5 x 1.5 mm voxels)
        i, j, k = c.ijk
        return np.sqrt((5.0 * (zz - k)) ** 2 + (1.5 * (yy - j)) ** 2 + (1.5 * (xx - i)) ** 2)

    nearer_bg = mm_from(bg) < np.minimum(mm_from(fg1), mm_from(fg2)) - 3.0  # 3 mm: the model grid's resampling
    assert not ((after != cut) & nearer_bg).any(), "the foreground point changed voxels nearer the background point"
    assert after[fg2.ijk[::-1]]


def test_a_foreground_click_only_adds_to_the_label_and_a_background_click_only_removes():
    """The annotator's intent has a sign: within a click's reach the copy of the head may only add
    structure for a foreground point and only remove it for a background one, so a click never
    takes away what the annotator did not point at (nor leaks where they asked to cut)."""
    arr = np.zeros((24, 96, 96), np.float32)
    zz, yy, xx = np.mgrid[:24, :96, :96]
    ring = ((yy - 48) ** 2 + (xx - 48) ** 2 <= 256) & ((yy - 48) ** 2 + (xx - 48) ** 2 > 64)
    arr[(np.abs(zz - 12) <= 6) & ring] = 1.0  # a bright ring, a dim core
    arr[(np.abs(zz - 12) <= 6) & ((yy - 48) ** 2 + (xx - 48) ** 2 <= 64)] = 0.6
    adapter, stack, geom, feats = _click_study(arr, seed=1)
    state = Corrections(start=None, saved=None, one_piece=False)
    shown = apply_clicks(adapter, stack, geom, feats, state, [Click((48, 62, 12), True)])  # on the ring
    for click in [Click((48, 48, 12), True), Click((48, 48, 10), False), Click((60, 48, 14), True)]:
        after = apply_clicks(adapter, stack, geom, feats, state, [click])
        if click.foreground:
            assert after[click.ijk[::-1]], f"the foreground click at {click.ijk} is not in the label"
            assert not (shown & ~after).any(), f"a foreground click at {click.ijk} removed structure"
        else:
            assert not (after & ~shown).any(), f"a background click at {click.ijk} added structure"
        assert (after != shown).any(), f"the click at {click.ijk} changed nothing"
        shown = after
