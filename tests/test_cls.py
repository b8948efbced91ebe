"""Few-shot classification core on real data: MedMNIST loading, episodes, adaptation, meta-training."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from monailabel_metaapp.core.cls_data import (
    ClsEpisodeSampler,
    ClsSet,
    load_medmnist,
    region_set,
    synthetic_abnormal,
    to_views,
)
from monailabel_metaapp.core.cls_metatrain import UNLABELLED_PREFIX, cls_sources
from monailabel_metaapp.core.cls_model import ClsModelConfig, FewShotClsModel, adapt
from monailabel_metaapp.core.episodes import load_studies, split_validation
from monailabel_metaapp.evaluate_cls import scores, support_indices

SMALL = ClsModelConfig(size=28, channels=(16, 32, 32, 32))


@pytest.fixture(scope="module")
def pneumonia(shared):
    return shared / "pneumoniamnist" / "pneumoniamnist.npz"


def test_medmnist_layouts_and_bad_files(pneumonia, tmp_path):
    s = load_medmnist(pneumonia, "test", 28)
    assert s.images.shape == (624, 1, 28, 28) and s.classes() == [0, 1]
    assert 0.0 <= float(s.images.min()) and float(s.images.max()) <= 1.0
    vol = np.random.default_rng(0).integers(0, 255, (4, 20, 24, 28), dtype=np.uint8)
    assert to_views(vol, 28).shape == (4, 3, 28, 28), "a 3D volume is three orthogonal views"
    rgb = np.zeros((4, 28, 28, 3), np.uint8)
    assert to_views(rgb, 28).shape == (4, 1, 28, 28)
    # whole images are seen through their central 80%: a 2-pixel frame (a border, burnt-in text) drops out
    framed = np.zeros((2, 28, 28), np.uint8)
    framed[:, :2] = framed[:, -2:] = framed[:, :, :2] = framed[:, :, -2:] = 255
    framed[:, 14, 14] = 128
    assert float(to_views(framed, 32).max()) < 0.6 and float(to_views(framed, 32, crop=1.0).max()) == 1.0
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((3, 28, 28)), train_labels=np.zeros((2, 1)))
    with pytest.raises(ValueError, match="3 images but"):
        load_medmnist(bad, "train", 28)
    with pytest.raises(ValueError, match="no \\['test_images'"):
        load_medmnist(bad, "test", 28)


def test_episodes_from_medmnist_regions_and_ssl(pneumonia, cmr_readonly):
    med = load_medmnist(pneumonia, "train", 28)
    regions = region_set(load_studies([cmr_readonly], 160, progress=False), 28)
    assert sorted(regions.classes()) == [0, 1, 2], "one class per cardiac structure"
    sampler = ClsEpisodeSampler([med, regions], med.images[:50], n_way=2, k_shot=3, n_query=4, ssl_fraction=0.3)
    sources = set()
    for _ in range(30):
        ep = sampler.sample()
        sources.add(ep.source.split(":")[0])
        assert ep.x_support.shape == (6, 1, 28, 28) and ep.x_query.shape == (8, 1, 28, 28)
        assert sorted(ep.y_support.tolist()) == [0, 0, 0, 1, 1, 1]
        assert sorted(ep.y_query.tolist()) == [0] * 4 + [1] * 4
    assert sources == {"pneumoniamnist", "regions", "ssl"}


def test_harder_episodes_more_ways_augmentation_and_synthetic_abnormal(pneumonia):
    med = load_medmnist(pneumonia, "train", 28)
    multi = ClsSet(med.images[:300], torch.arange(300) % 6, "six")
    sampler = ClsEpisodeSampler(
        [multi], med.images[:100], 2, 3, 4, ssl_fraction=0.3, max_way=5, augment=1.0, abnormal_fraction=0.3
    )
    ways, sources = set(), set()
    for _ in range(60):
        ep = sampler.sample()
        ways.add(ep.n_way)
        sources.add(ep.source)
        assert ep.x_support.shape == (3 * ep.n_way, 1, 28, 28) and ep.x_query.shape == (4 * ep.n_way, 1, 28, 28)
        assert sorted(ep.y_support.unique().tolist()) == list(range(ep.n_way))
        assert 0.0 <= float(ep.x_query.min()) and float(ep.x_query.max()) <= 1.0
    assert ways == {2, 3, 4, 5} and sources == {"six", "ssl", "abnormal"}
    x = med.images[:8]
    style = {"blobs": 2, "sigma": (0.1, 0.2), "amp": 0.4, "brighten": True}
    y = synthetic_abnormal(x, style, random.Random(0))
    assert y.shape == x.shape and bool((y >= x - 1e-6).all()) and float((y - x).abs().mean()) > 0.01
    # off by default: the original 2-way tasks (and no extra random draws)
    plain = ClsEpisodeSampler([multi], None, 2, 3, 4, seed=1)
    assert all(plain.sample().n_way == 2 for _ in range(10))


def test_unlabelled_source_reads_only_the_train_images(tmp_path, monkeypatch):
    """`unlabelled:FILE` (a site's own images for self-supervised tasks) never reads a label."""
    f = tmp_path / "site.npz"
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (40, 28, 28), dtype=np.uint8)
    np.savez(f, train_images=imgs, train_labels=np.zeros((40, 1)), val_images=imgs, val_labels=np.zeros((40, 1)))
    real_load, read = np.load, []

    class Spy:
        def __init__(self, z):
            self.z, self.files = z, z.files

        def __getitem__(self, key):
            read.append(key)
            return self.z[key]

        def __contains__(self, key):
            return key in self.z.files

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.z.close()

    monkeypatch.setattr(np, "load", lambda path, *a, **k: Spy(real_load(path, *a, **k)))
    train, val, pool = cls_sources([f"{UNLABELLED_PREFIX}{f}"], 32, 1.0)
    assert train == [] and val == [] and pool.shape == (40, 1, 32, 32)
    assert read == ["train_images"], read


def test_classification_validation_regions_come_from_held_out_studies(cmr_readonly):
    studies = load_studies([cmr_readonly], 160, progress=False)
    train_studies, val_studies = split_validation(studies, seed=0)
    assert len(val_studies) == 1 and not {s.name for s in val_studies} & {s.name for s in train_studies}
    train, val, _ = cls_sources([cmr_readonly], 28, 1.0)
    assert len(val) == 1 and val[0].classes() == [0, 1, 2], "a validation loss even without a MedMNIST file"
    assert torch.equal(val[0].images, region_set(val_studies, 28).images)
    assert torch.equal(train[0].images, region_set(train_studies, 28).images)


def test_a_two_way_task_learned_from_ten_real_examples_beats_chance(pneumonia):
    torch.manual_seed(0)
    model = FewShotClsModel(SMALL).eval()
    train, test = load_medmnist(pneumonia, "train", 28), load_medmnist(pneumonia, "test", 28)
    idx = torch.from_numpy(support_indices(train.labels, 10, np.random.default_rng(0)))
    with torch.no_grad():
        f_s, f_t = model.embed(train.images[idx]), model.embed(test.images)
    params = adapt(model, f_s, train.labels[idx], 2, steps=20)
    proba = torch.softmax(model.head.logits(f_t, params), 1).detach().numpy()
    s = scores(test.labels.numpy(), proba)
    assert s["auc"] > 0.6 and s["bacc"] > 0.55, s
    # the adapted head must beat its own prototype initialisation on the support
    p0 = model.head.init_params(f_s, train.labels[idx], 2)
    ce = torch.nn.functional.cross_entropy
    assert ce(model.head.logits(f_s, params), train.labels[idx]) < ce(model.head.logits(f_s, p0), train.labels[idx])


def test_cls_meta_training_lowers_the_episode_loss(pneumonia, tmp_path):
    from monailabel_metaapp.core.checkpoint import load_cls_model
    from monailabel_metaapp.core.cls_metatrain import meta_train_cls
    from monailabel_metaapp.core.metatrain import MetaTrainConfig

    cfg = MetaTrainConfig(minutes=5, max_steps=40, tasks_per_step=4, ssl_fraction=0.0, val_every=1000, val_tasks=8)
    out = tmp_path / "new_folder" / "cls.pt"  # created on demand, as `--out runs/cls.pt` would be
    summary = meta_train_cls([pneumonia], out, cfg, SMALL, n_way=2, k_shot=5, device="cpu", progress=False)
    log = [line for line in (out.parent / "cls.pt.log.jsonl").read_text().splitlines() if '"task_loss"' in line]
    losses = [float(line.split('"task_loss": ')[1].split(",")[0]) for line in log]
    assert summary["steps"] == 40
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    model = load_cls_model(out)
    assert isinstance(model, FewShotClsModel) and model.cfg.channels == SMALL.channels
    assert torch.load(out, weights_only=True).keys() == model.state_dict().keys()
    # the head: one linear layer on blocks 1+2 and one on every block, probabilities averaged
    x = load_medmnist(pneumonia, "val", 28).images[:6]
    with torch.no_grad():
        f = model.embed(x)
    assert f.shape == (6, 16 + 32 + 32 + 32) and model.head.view_dims[0] == list(range(16, 80))
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    params = adapt(model, f, y, 2, steps=5)
    assert params["W0"].shape == (2, 64) and params["W1"].shape == (2, 112) and model.head.matches(params)
    # features centred on the support mean (fixed by the inner loop), each block scaled to unit length
    assert torch.equal(params["mu"], f.mean(0))
    z = model.head.normalise(f, params)
    for b in model.cfg.block_slices():
        assert torch.allclose(z[:, b].norm(dim=1), torch.ones(6), atol=1e-5)
    p_views = [
        torch.softmax(z[:, d] @ params[f"W{i}"].T + params[f"b{i}"], 1) for i, d in enumerate(model.head.view_dims)
    ]
    assert torch.allclose(torch.softmax(model.head.logits(f, params), 1), (p_views[0] + p_views[1]) / 2, atol=1e-5)
    assert not model.head.matches({"W": params["W0"], "b": params["b0"]}), "a head of another model is stale"


def test_distillation_trains_a_smaller_student_to_adapt_like_its_teacher(pneumonia, tmp_path):
    from monailabel_metaapp.core.checkpoint import load_cls_model, save_model
    from monailabel_metaapp.core.distill import distill_cls
    from monailabel_metaapp.core.metatrain import MetaTrainConfig

    torch.manual_seed(0)
    teacher = FewShotClsModel(ClsModelConfig(size=28, channels=(16, 32, 32, 32)))
    save_model(teacher, tmp_path / "teacher.pt")
    cfg = MetaTrainConfig(minutes=5, max_steps=40, tasks_per_step=4, ssl_fraction=0.0)
    out = tmp_path / "student.pt"
    # no student config: the default student is the teacher's design at half its width
    distill_cls(tmp_path / "teacher.pt", [pneumonia], out, cfg, None, device="cpu", progress=False)
    log = [line for line in (tmp_path / "student.pt.log.jsonl").read_text().splitlines() if '"task_loss"' in line]
    losses = [float(line.split('"task_loss": ')[1].split(",")[0]) for line in log]
    assert len(losses) == 40 and np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    student = load_cls_model(out)
    assert student.cfg.channels == (8, 16, 16, 16) and student.cfg.size == 28
    n_student = sum(p.numel() for p in student.encoder.net.parameters())
    assert n_student < sum(p.numel() for p in teacher.encoder.net.parameters()) / 3


def test_channel_lists_from_the_command_line_are_parsed_or_refused_with_why():
    assert ClsModelConfig.from_channels("8,16,16,16").channels == (8, 16, 16, 16)
    with pytest.raises(ValueError, match="comma-separated integers"):
        ClsModelConfig.from_channels("8,x,16,16")
    with pytest.raises(ValueError, match="head_views"):  # too few blocks for the heads
        ClsModelConfig.from_channels("8")


def test_the_image_crop_is_kept_with_the_weights(tmp_path):
    """A model must be fed whole images as it was meta-trained on them, whatever the default."""
    import json
    from pathlib import Path

    import monailabel_metaapp
    from monailabel_metaapp.core.checkpoint import load_cls_model, save_model, sidecar

    path = tmp_path / "uncropped.pt"
    save_model(FewShotClsModel(ClsModelConfig(size=28, channels=(8, 8, 8, 8), image_crop=1.0)), path)
    assert load_cls_model(path).cfg.image_crop == 1.0
    meta = json.loads(sidecar(path).read_text())
    del meta["config"]["image_crop"]  # a sidecar written before the crop existed
    sidecar(path).write_text(json.dumps(meta))
    assert load_cls_model(path).cfg.image_crop == 1.0, "older models saw whole images uncropped"
    shipped = Path(monailabel_metaapp.__file__).parent / "weights" / "metacls.pt"
    assert load_cls_model(shipped).cfg.image_crop == 0.8, "the shipped classifier was meta-trained on 80% crops"
    with pytest.raises(ValueError, match="image_crop"):
        ClsModelConfig(image_crop=0.0)
    # resuming meta-training with another crop would mix two preprocessings in one model: refused
    from monailabel_metaapp.core.metatrain import check_resumable_config

    save_model(FewShotClsModel(ClsModelConfig(size=28, channels=(8, 8, 8, 8), image_crop=1.0)), path)
    check_resumable_config(path, ClsModelConfig(size=28, channels=(8, 8, 8, 8), image_crop=1.0).to_dict())
    with pytest.raises(ValueError, match="image_crop: 1.0 -> 0.8"):
        check_resumable_config(path, ClsModelConfig(size=28, channels=(8, 8, 8, 8)).to_dict())
