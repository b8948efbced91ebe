"""Test-time settings of the segmentation head, measured on validation studies of held-out structures.

Leave-one-structure-out fold models (meta-trained without the structure's labels) adapt heads on
MS-CMRSeg studies 1-25, whose labels of that structure meta-training never read; the test studies
(26-35) are not touched. Two questions, each answered on the same heads side by side:

1. inner-loop steps (0, 3, 10 = the product, 30) x support slices per adaptation (24 = the product, 48);
2. a spatial prior of the support labels (a coarse probabilistic atlas: the support masks averaged on
   an 8 x 20 x 20 grid indexed by relative slice position) added to the head's logits with weight w,
   whole-volume and oracle protocols. Written here, not in the product: it was not adopted.

    python benchmarks/experiments/seg_test_time_choices.py --models fold500=F500.pt fold600=F600.pt [--repeats 3]

The folds: `metaapp meta-train --studies cmr_train.npz totalseg.npz --exclude V --max-steps 250
--device cpu --tasks-per-step 8` (banks as in the model card). Writes
benchmarks/results/seg_test_time_choices.json + .png."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from monailabel_metaapp.core.adaptation import SegAdapter, dice
from monailabel_metaapp.core.checkpoint import load_model
from monailabel_metaapp.evaluate import _oracle, _probs_to_mask, draw_order, load_eval_studies
from monailabel_metaapp.provenance import stamp
from monailabel_metaapp.shared_data import cmr_view, require_shared_datasets

STEPS, SLICES, WEIGHTS = (0, 3, 10, 30), (24, 48), (0.0, 0.25, 0.5, 1.0, 2.0)
EPS = 0.05  # the prior's probability is kept in [EPS, 1 - EPS]


def spatial_prior(masks: list[torch.Tensor]) -> torch.Tensor:
    """(8, 20, 20) mean of the support masks, each resampled by relative slice position."""
    maps = []
    for m in masks:
        m = m.float()
        if m.shape[0] == 1:  # one slice (the oracle's chunks): the same at every position
            maps.append(F.interpolate(m[None], size=(20, 20), mode="area")[0].expand(8, 20, 20))
        else:
            maps.append(F.interpolate(m[None, None], size=(8, 20, 20), mode="area")[0, 0])
    return torch.stack(maps).mean(0)


class PriorAdapter(SegAdapter):
    """The product's adapter with the prior's log-odds added to each head's logits. Under the oracle
    protocol the prior of each chunk comes from the support slices that chunk's head adapts on."""

    prior: torch.Tensor | None = None
    weight = 0.0
    oracle = False

    def adapt_features(self, feats, masks, steps=None):
        if self.oracle:  # one middle slice per support study
            self.prior = spatial_prior([m[None] for m in masks])
        return super().adapt_features(feats, masks, steps)

    @torch.no_grad()
    def predict(self, stack, heads, feats=None):
        probs = super().predict(stack, heads, feats)
        if not self.weight or self.prior is None:
            return probs
        p = F.interpolate(self.prior[None, None], size=tuple(stack.shape), mode="trilinear", align_corners=False)
        p = p[0, 0].clamp(EPS, 1 - EPS)
        logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6)) + self.weight * (torch.log(p) - torch.log1p(-p))
        return torch.sigmoid(logits)


def run_fold(model: str, value: int, folder: Path, repeats: int) -> dict:
    torch.manual_seed(0)
    ad = PriorAdapter(load_model(model, torch.device("cpu")), "cpu")
    data = [s for s in load_eval_studies(folder, ad.size) if (s.ref == value).any()]
    feats = {s.name: ad.embed(s.stack) for s in data}
    dices: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for k in (1, 3, 5):
        for r in range(repeats):
            order = draw_order(data, 0, value, k, r)
            support, query = order[:k], order[k : k + 5]
            stacks, masks = [s.stack for s in support], [s.lstack == value for s in support]
            for steps in STEPS:
                for n_slices in SLICES:
                    ad.max_slices, ad.weight = n_slices, 0.0
                    t = time.perf_counter()
                    head = ad.adapt(stacks, masks, steps=steps, feats=[feats[s.name] for s in support])
                    key = f"steps k={k} steps={steps} slices={n_slices}"
                    seconds.setdefault(key, []).append(time.perf_counter() - t)
                    for q in query:
                        pred = _probs_to_mask(ad.predict(q.stack, [head], feats=feats[q.name]), q.geom, head.one_piece)
                        dices.setdefault(key, []).append(dice(pred, q.ref == value))
            ad.max_slices = 24
            head = ad.adapt(stacks, masks, feats=[feats[s.name] for s in support])
            for w in WEIGHTS:
                ad.weight, ad.prior, ad.oracle = w, spatial_prior(masks), False
                for q in query:
                    pred = _probs_to_mask(ad.predict(q.stack, [head], feats=feats[q.name]), q.geom, head.one_piece)
                    dices.setdefault(f"prior volume k={k} w={w}", []).append(dice(pred, q.ref == value))
                if k in (1, 5):
                    ad.oracle = True
                    for q in query:
                        d = _oracle(ad, support, q, value, head.one_piece)[0]
                        dices.setdefault(f"prior oracle k={k} w={w}", []).append(d)
            ad.weight, ad.oracle = 0.0, False
    return {
        "model": model,
        "value": value,
        "dice": {key: round(statistics.fmean(v), 4) for key, v in dices.items()},
        "dice_std": {key: round(statistics.pstdev(v), 4) for key, v in dices.items()},
        "n": {key: len(v) for key, v in dices.items()},
        "head_seconds": {key: round(statistics.fmean(v), 3) for key, v in seconds.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", required=True, help="foldV=FILE, V the held-out label value")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/seg_test_time_choices.json")
    a = ap.parse_args()
    require_shared_datasets()
    folder = cmr_view(Path(tempfile.mkdtemp()) / "cmr_val", list(range(1, 26)))
    t0 = time.time()
    folds = {}
    for spec in a.models:
        tag, path = spec.split("=", 1)
        folds[tag] = run_fold(path, int(tag.removeprefix("fold")), folder, a.repeats)
        print(tag, json.dumps(folds[tag]["dice"], indent=1))
    out = Path(a.out)
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/experiments/seg_test_time_choices.py --models "
                + " ".join(a.models)
                + f" --repeats {a.repeats}",
                "validation_studies": list(range(1, 26)),
                "torch_threads": torch.get_num_threads(),
                "minutes": round((time.time() - t0) / 60, 1),
                "folds": folds,
                "provenance": stamp([m.split("=", 1)[1] for m in a.models]),
            },
            indent=2,
        )
    )
    plot(folds, out.with_suffix(".png"))


def plot(folds: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(folds), figsize=(4.6 * len(folds), 7), squeeze=False)
    for col, (tag, f) in enumerate(folds.items()):
        ax = axes[0][col]
        for n_slices in SLICES:
            for k in (1, 3, 5):
                ax.plot(
                    STEPS,
                    [f["dice"][f"steps k={k} steps={s} slices={n_slices}"] for s in STEPS],
                    marker="o",
                    ls="-" if n_slices == 24 else "--",
                    label=f"k={k}, {n_slices} slices",
                )
        ax.set(title=f"{tag}: inner-loop steps", xlabel="steps (product: 10)", ylabel="Dice (volume)", ylim=(0, 1))
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for proto in ("volume", "oracle"):
            for k in (1, 3, 5):
                keys = [f"prior {proto} k={k} w={w}" for w in WEIGHTS]
                if keys[0] in f["dice"]:
                    ax.plot(
                        WEIGHTS,
                        [f["dice"][x] for x in keys],
                        marker="o",
                        ls="-" if proto == "volume" else ":",
                        label=f"{proto}, k={k}",
                    )
        ax.set(title=f"{tag}: spatial prior weight", xlabel="w (0: the product)", ylabel="Dice", ylim=(0, 1))
        ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
