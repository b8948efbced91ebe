"""Which levels of the segmentation encoder separate a structure that meta-training never saw?

The classifier's lesson (`cls_feature_blocks.py`) was that the last, most task-specific features
transfer worst to what meta-training did not see. This asks the same of the segmentation network
(MONAI BasicUNet): for each fold model (meta-trained without one cardiac structure), the output of
every decoder stage (`upcat_4` at 1/8 resolution ... `upcat_1` at full resolution), the embedding
the product's head sees (`final_conv`), and a hypercolumn of all of them (each stage upsampled and
scaled to unit length per pixel), are used as frozen features for the held-out structure:

1-shot, one support study of cardiac MRI studies 26-35 (never meta-trained on), the product's
foreground and background prototypes (cosine k-means, 2 and 8, over the support slices that hold
the structure), each pixel of the other studies' slices within the structure's extent (the oracle
protocol's slice restriction) given to the class of its most similar prototype. Dice over those
slices on the 160x160 model grid. No gradient step: this measures the features, not the product.

    python benchmarks/experiments/seg_feature_levels.py --models F200.pt F500.pt F600.pt --values 200 500 600

Writes JSON and a PNG (Dice per level and structure). Needs ../shared/datasets."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from monailabel_metaapp.core.checkpoint import load_model
from monailabel_metaapp.core.episodes import load_studies, with_context
from monailabel_metaapp.core.networks import prototypes
from monailabel_metaapp.provenance import stamp
from monailabel_metaapp.shared_data import CMR_STRUCTURES, cmr_view, require_shared_datasets

LEVELS = ["upcat_4", "upcat_3", "upcat_2", "upcat_1", "final_conv"]


@torch.no_grad()
def level_features(model, stack: torch.Tensor, idx: list[int]) -> dict[str, torch.Tensor]:
    """{level: (len(idx), C, size, size)} features, each upsampled to the slice grid."""
    net, out = model.encoder.net, {}
    hooks = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n in LEVELS]
    try:
        model.embed(with_context(stack, idx, model.cfg.context))
    finally:
        for h in hooks:
            h.remove()
    size = stack.shape[-1]
    feats = {n: F.interpolate(out[n], size=(size, size), mode="bilinear") for n in LEVELS}
    feats["hypercolumn"] = torch.cat([F.normalize(feats[n], dim=1) for n in LEVELS], 1)
    return feats


def proto_dice(f_s: torch.Tensor, m_s: torch.Tensor, f_q: torch.Tensor, m_q: torch.Tensor) -> float:
    """Dice of the nearest-prototype prediction: the product's cosine k-means prototypes (2 foreground,
    8 background, `networks.prototypes`), each query pixel to the class of its most similar one."""
    pix = f_s.permute(0, 2, 3, 1)
    fg = prototypes(pix[m_s], 2, fallback=pix[~m_s])
    bg = prototypes(pix[~m_s], 8, fallback=pix[m_s])
    fq = F.normalize(f_q, dim=1)
    sim = torch.einsum("nchw,kc->nkhw", fq, F.normalize(torch.cat([fg, bg]), dim=1))
    pred = sim[:, :2].amax(1) > sim[:, 2:].amax(1)
    inter = (pred & m_q).sum().item()
    return 2 * inter / max(1, pred.sum().item() + m_q.sum().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="fold models, one per held-out structure")
    ap.add_argument("--values", nargs="+", type=int, required=True, help="the label value each fold held out")
    ap.add_argument("--repeats", type=int, default=10, help="support studies drawn per structure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/seg_feature_levels.json")
    a = ap.parse_args()
    if len(a.models) != len(a.values):
        raise SystemExit("--models and --values must pair up")
    require_shared_datasets()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    names = {v: k for k, v in CMR_STRUCTURES.items()}
    rows = []
    for path, value in zip(a.models, a.values):
        model = load_model(path).eval()
        studies = load_studies([cmr_view(tmp / "cmr", list(range(26, 36)))], model.cfg.size, progress=False)
        cache = {}
        for s in studies:
            mask = s.label == value
            idx = [int(z) for z in torch.nonzero(mask.flatten(1).any(1)).flatten()]
            cache[s.name] = (level_features(model, s.image.float() / 255.0, idx), mask[idx])
        rng = np.random.default_rng(a.seed)
        for r in range(a.repeats):
            support = studies[int(rng.integers(len(studies)))].name
            f_s, m_s = cache[support]
            for level in [*LEVELS, "hypercolumn"]:
                scores = [proto_dice(f_s[level], m_s, f[level], m) for n, (f, m) in cache.items() if n != support]
                rows.append(
                    {
                        "model": str(path),
                        "structure": names.get(value, str(value)),
                        "value": value,
                        "level": level,
                        "repeat": r,
                        "support": support,
                        "dice": float(np.mean(scores)),
                    }
                )
        print(f"{path}: done", flush=True)
    summary = {}
    for row in rows:
        summary.setdefault((row["structure"], row["level"]), []).append(row["dice"])
    table = [
        {"structure": s, "level": lv, "dice_mean": float(np.mean(d)), "dice_std": float(np.std(d)), "n": len(d)}
        for (s, lv), d in summary.items()
    ]
    for t in table:
        print(json.dumps(t))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"summary": table, "rows": rows, "command": "python " + " ".join(sys.argv), "provenance": stamp(a.models)},
            indent=2,
        )
    )
    plot(table, out.with_suffix(".png"))


def plot(table: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [*LEVELS, "hypercolumn"]
    structures = sorted({t["structure"] for t in table})
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(structures)
    for i, s in enumerate(structures):
        by = {t["level"]: t for t in table if t["structure"] == s}
        ax.bar(
            np.arange(len(levels)) + i * w,
            [by[lv]["dice_mean"] for lv in levels],
            w,
            yerr=[by[lv]["dice_std"] for lv in levels],
            label=f"{s} (held out)",
        )
    ax.set_xticks(np.arange(len(levels)) + w * (len(structures) - 1) / 2, levels)
    ax.set_ylabel("1-shot prototype Dice (frozen features)")
    ax.set_title("Segmentation encoder levels on a structure meta-training never saw")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
