"""The device-side episode pipeline (`core/episode_bank.py`) on real cardiac studies: the kinds of task
and their shares, the masks each kind is cut from, held-out structures, and `meta-train --sampler bank`
with its per-kind logs and `--profile`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from monailabel_metaapp.core.episode_bank import BankSampler, SliceBank, TaskShares
from monailabel_metaapp.core.episodes import load_studies, save_bank
from monailabel_metaapp.core.metatrain import MetaTrainConfig, meta_train
from monailabel_metaapp.core.networks import SegModelConfig

SMALL = SegModelConfig(size=64, features=(8, 8, 16, 16, 32, 8), emb=8)
FAST = TaskShares(superpixel_scales=(60, 200))


def _find(bank: SliceBank, centre: torch.Tensor) -> int:
    """The bank index of the slice shown as an episode's centre channel (unaugmented)."""
    hits = (bank.images == (centre * 255).round().to(torch.uint8)).flatten(1).all(1).nonzero().flatten()
    assert len(hits) >= 1
    return int(hits[0])


def test_each_kind_is_cut_from_its_own_pseudo_or_real_label(cmr_readonly):
    studies = load_studies([cmr_readonly], 64, progress=False)
    bank = SliceBank(studies, context=1, shares=FAST, exclude={600}, progress=False)
    assert {k[1] for k in bank.structures} == {(200,), (500,)}, "a held-out structure must never be drawn"
    assert {k[1] for k in bank.merges} == {(200, 500)}, "LV wall and blood pool touch; 600 is held out"
    sampler = BankSampler(bank, FAST, seed=0, augment=False)
    for kind in ("labelled", "merge", "superpixel"):
        for ep in sampler.sample_batch(6, kind):
            assert ep.structure == kind and ep.x_support.shape[1:] == (3, 64, 64)
            i = _find(bank, ep.x_support[0, 1])
            lab = bank.labels[i]
            if kind == "labelled":
                assert any(torch.equal(ep.y_support[0].bool(), lab == v) for v in (200, 500))
            elif kind == "merge":
                assert torch.equal(ep.y_support[0].bool(), (lab == 200) | (lab == 500))
            else:  # a superpixel of one of the bank's scales, of usable size, inside the slice
                assert any(torch.equal(ep.y_support[0], (sp[i] == sp[i][ep.y_support[0] > 0][0]).float())
                           for sp in bank.superpixels)  # fmt: skip
                assert 0.005 < ep.y_support[0].mean() < 0.15
            assert ep.y_support.sum() > 0, "the support must show the structure"
            # context channels are the slice's neighbours in its own study
            assert torch.equal(ep.x_support[0], bank.slices(torch.tensor([i]))[0])


def test_shares_decide_the_mix_and_augmentation_keeps_the_support(cmr_readonly):
    studies = load_studies([cmr_readonly], 64, progress=False)
    shares = TaskShares(labelled=0.6, merge=0.0, superpixel=0.4, superpixel_scales=(100,), intensity_prob=1.0)
    sampler = BankSampler(SliceBank(studies, 1, shares, progress=False), shares, seed=1)
    eps = sampler.sample_batch(300)
    kinds = [ep.structure for ep in eps]
    assert "merge" not in kinds
    assert abs(kinds.count("labelled") / 300 - 0.6) < 0.08
    assert all(ep.y_support.sum() > 0 for ep in eps), "an augmented support lost its structure"
    assert all(torch.isfinite(ep.x_query).all() for ep in eps)
    assert sampler.kinds_drawn["labelled"] == kinds.count("labelled")


def test_meta_train_with_the_bank_sampler_logs_each_kind(cmr_readonly, tmp_path):
    studies = load_studies([cmr_readonly], 64, progress=False)
    shares = {"superpixel_scales": (100,)}
    cfg = MetaTrainConfig(minutes=5, max_steps=4, tasks_per_step=4, inner_steps=1, val_every=2, val_tasks=2,
                          sampler="bank", task_shares=shares, checkpoint_seconds=1e9)  # fmt: skip
    meta_train(studies, tmp_path / "m.pt", cfg, SMALL, device="cpu", progress=False)
    log = [json.loads(line) for line in (tmp_path / "m.pt.log.jsonl").read_text().splitlines()]
    assert any(k.startswith("task_") for r in log[:-1] for k in r), "no per-kind task loss logged"
    val = next(r for r in log if "val_loss" in r)
    assert {"val_loss_merge", "val_loss_superpixel"} <= set(val), "validation is not split by kind"
    side = json.loads((tmp_path / "m.pt.json").read_text())
    assert side["meta_train"]["sampler"] == "bank"
    assert side["meta_train"]["task_shares"]["merge"] == 0.15, "the weights must record every share, defaults too"


def test_profile_under_torchrun_bills_the_all_reduce(cmr_readonly, tmp_path):
    """`meta-train --profile N` through the unchanged CLI, two CPU ranks (gloo): the one-line split is
    printed once and written as JSON, and the gradient all-reduce has its own share."""
    from monailabel_metaapp.devserver import free_port

    bank = tmp_path / "bank.npz"
    save_bank(load_studies([cmr_readonly], 32, progress=False), bank)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "monailabel_metaapp", "meta-train", "--studies", str(bank), "--out", str(tmp_path / "p.json"),
           "--profile", "2", "--sampler", "bank", "--task-shares", "superpixel_scales=100", "--size", "32",
           "--device", "cpu", "--tasks-per-step", "2", "--inner-steps", "1"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("profile: ")]
    assert len(lines) == 1 and lines[0].endswith("episodes/s")
    prof = json.loads((tmp_path / "p.json").read_text())
    assert prof["world"] == 2 and prof["steps"] == 2 and prof["episodes"] == 8
    assert abs(sum(prof["share"].values()) - 1) < 0.01 and prof["share"]["all-reduce"] > 0
    assert not (tmp_path / "p.json.state.pt").exists(), "a profile run must not write a checkpoint"
