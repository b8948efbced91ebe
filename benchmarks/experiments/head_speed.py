"""Seconds of the product's k=1 adaptation on the CPU, the current head against its previous
formulation, side by side in one process (alternating, medians).

The head's cosine similarities used to be two einsums over (N, C, H, W) features, which copied the
features into another layout at every inner step; they are now one matmul over channels-last
features. The math is the same: the script checks that both heads give the same logits.

    python benchmarks/experiments/head_speed.py [--repeats 7] [--threads 2]

Support: one MS-CMRSeg study of 19 slices (256 x 256), LV blood
pool, the shipped model, 10 inner steps; the support slices are embedded inside the timing, as in
the app's first adaptation. Writes benchmarks/results/head_speed.json + .png."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from monailabel_metaapp.core.adaptation import SegAdapter
from monailabel_metaapp.core.checkpoint import load_model
from monailabel_metaapp.core.networks import PrototypeHead
from monailabel_metaapp.core.volume import label_slices, read_image, to_slices
from monailabel_metaapp.provenance import SHIPPED_SEG, stamp
from monailabel_metaapp.shared_data import require_shared_datasets


class EinsumHead(PrototypeHead):
    """The previous formulation of the head (features in their default layout, two einsums)."""

    @staticmethod
    def logits(feats: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = feats.contiguous()  # the layout the previous adapter passed
        f = F.normalize(feats, dim=1)
        s_fg = torch.einsum("nchw,kc->nkhw", f, F.normalize(params["fg"], dim=1))
        s_bg = torch.einsum("nchw,kc->nkhw", f, F.normalize(params["bg"], dim=1))
        t = 0.1
        d = t * (torch.logsumexp(s_fg / t, 1) - torch.logsumexp(s_bg / t, 1))
        conv = F.conv2d(feats, params["conv.weight"], params["conv.bias"], padding=1)
        return torch.exp(params["log_scale"]) * d + params["bias"] + conv[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--study", type=int, default=1, help="MS-CMRSeg study id (1 has 19 slices)")
    ap.add_argument("--out", default="benchmarks/results/head_speed.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = require_shared_datasets() / "cmr_bssfp"
    model = load_model(None, torch.device("cpu"))
    before = copy.deepcopy(model)
    before.head.__class__ = EinsumHead
    adapters = {"previous head (einsum)": SegAdapter(before), "current head (matmul, channels-last)": SegAdapter(model)}
    image = read_image(root / f"image_{a.study}.nii.gz")
    stack, geom = to_slices(image, model.cfg.size)
    mask = label_slices(read_image(root / f"label_{a.study}.nii.gz"), geom, model.cfg.size) == 500
    times: dict[str, list[float]] = {k: [] for k in adapters}
    heads = {}
    for i in range(a.repeats + 1):
        for name, ad in adapters.items():
            t = time.perf_counter()
            heads[name] = ad.adapt([stack], [mask])
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    feats = adapters["current head (matmul, channels-last)"].embed(stack)
    (h_old, h_new) = (heads[k].params for k in adapters)
    gap = float((EinsumHead.logits(feats, h_old) - PrototypeHead.logits(feats, h_new)).abs().max())
    med = {k: statistics.median(v) for k, v in times.items()}
    old, new = med.values()
    result = {
        "command": f"python benchmarks/experiments/head_speed.py --repeats {a.repeats} --threads {a.threads}",
        "volume": {"study": a.study, "size": list(image.GetSize()), "slices_on_model_grid": int(stack.shape[0])},
        "torch_threads": a.threads,
        "adapt_seconds_median": {k: round(v, 3) for k, v in med.items()},
        "adapt_seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "speedup": round(old / new, 2),
        "max_logit_difference_of_the_two_adapted_heads": gap,
    }
    print(json.dumps(result, indent=2))
    result["provenance"] = stamp([SHIPPED_SEG])
    out = Path(a.out)
    out.write_text(json.dumps(result, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.boxplot(list(times.values()), orientation="horizontal", tick_labels=list(times))
    ax.axvline(5.0, color="grey", ls="--", label="5 s target")
    ax.set_xlabel(f"k=1 adaptation, seconds ({a.threads} threads, {a.repeats} runs each)")
    ax.set_xlim(0, max(5.5, max(max(v) for v in times.values()) * 1.1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
