"""2D, 2.5D or 3D? The measurement behind the segmentation network's input.

Dice: models meta-trained alike (same sources, seed, steps and held-out structure), differing only
in their input: `--context 0` (2D, the slice alone) or `--context 1` (2.5D, the slice and its two
neighbours as channels). Each is evaluated on the held-out structure with `evaluate_seg` (whole
volume and the oracle protocol) on cardiac MRI studies 26-35, never meta-trained on.

Speed, on this machine, per model: the embedding of one whole cardiac volume (what a save costs
before the head's steps, and what every inference costs) and the k=1 adaptation. For 3D: MONAI's
BasicUNet of the same widths in 3D, random weights, on the same volume padded to a multiple of 16
slices. No 3D model is meta-trained: its embedding alone is timed, against the 2D ones.

    python benchmarks/experiments/seg_dims.py --models 2D=ctx0.pt 2.5D=ctx1.pt [--value 500] [--repeats 2] [--queries 5]

Writes benchmarks/results/seg_dims.json + .png. Needs ../shared/datasets."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet

from monailabel_metaapp.core.adaptation import SegAdapter
from monailabel_metaapp.core.checkpoint import load_model
from monailabel_metaapp.evaluate import evaluate_seg, load_eval_studies
from monailabel_metaapp.provenance import stamp
from monailabel_metaapp.shared_data import CMR_STRUCTURES, cmr_view, require_shared_datasets


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(adapter: SegAdapter, stack: torch.Tensor, mask: torch.Tensor, repeats: int) -> dict:
    return {
        "embed_volume_s": round(timed(lambda: adapter.embed(stack), repeats), 3),
        "adapt_k1_s": round(timed(lambda: adapter.adapt([stack], [mask]), repeats), 3),
    }


@torch.no_grad()
def speed_3d(features: tuple[int, ...], emb: int, stack: torch.Tensor, repeats: int) -> dict:
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=emb, features=features).eval()
    depth = -(-stack.shape[0] // 16) * 16
    x = F.pad(stack, (0, 0, 0, 0, 0, depth - stack.shape[0]))[None, None]
    return {"embed_volume_s": round(timed(lambda: net(x), repeats), 3), "padded_slices": depth}


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in result["dice"].items():
        for protocol, style in (("volume", "-o"), ("oracle", "--s")):
            rows = sorted((x for x in r[protocol] if x["method"] == "meta"), key=lambda x: x["shots"])
            a1.errorbar(
                [x["shots"] for x in rows],
                [x["dice_mean"] for x in rows],
                yerr=[x["dice_std"] for x in rows],
                fmt=style,
                capsize=3,
                label=f"{name} ({protocol})",
            )
    a1.set_xticks(sorted({x["shots"] for r in result["dice"].values() for x in r["volume"]}))
    a1.set_xlabel("support studies (shots)")
    a1.set_ylabel(f"Dice, {result['structure']} (held out)")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    names = list(result["speed"])
    a2.bar([n.replace(" (", "\n(") for n in names], [result["speed"][n]["embed_volume_s"] for n in names])
    a2.set_ylabel("seconds to embed one cardiac volume")
    a2.set_title(f"{result['volume_slices']} slices of {result['slice_size']}x{result['slice_size']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, metavar="NAME=FILE")
    ap.add_argument("--value", type=int, default=500, help="the held-out label value (500: LV blood pool)")
    ap.add_argument("--shots", default="1,3,5")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/seg_dims.json")
    a = ap.parse_args()
    models = dict(m.split("=", 1) for m in a.models)
    name = {v: k for k, v in CMR_STRUCTURES.items()}[a.value]
    root = require_shared_datasets()
    shots = [int(s) for s in a.shots.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        studies = cmr_view(Path(tmp) / "cmr", list(range(26, 36)))
        result: dict = {"structure": name, "models": models, "dice": {}, "speed": {}, "shared": str(root)}
        study = load_eval_studies(studies, 160)[0]
        stack, mask = study.stack, study.lstack == a.value
        result["volume_slices"], result["slice_size"] = int(stack.shape[0]), int(stack.shape[-1])
        features = emb = None
        for label, path in models.items():
            model = load_model(path, "cpu")
            features, emb = model.cfg.features, model.cfg.emb
            result["speed"][label] = speed(SegAdapter(model, "cpu"), stack, mask, a.timing_repeats)
            result["dice"][label] = {
                protocol: evaluate_seg(
                    studies,
                    shots,
                    {name: a.value},
                    path,
                    a.repeats,
                    a.queries,
                    baselines=[],
                    protocol=protocol,
                    device="cpu",
                )["rows"]
                for protocol in ("volume", "oracle")
            }
        result["speed"]["3D (same widths, not trained)"] = speed_3d(tuple(features), emb, stack, a.timing_repeats)
    result["torch_threads"] = torch.get_num_threads()
    result["command"] = "python " + " ".join(sys.argv)
    result["provenance"] = stamp(list(models.values()))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result["speed"], indent=1))
    for label, r in result["dice"].items():
        for protocol, rows in r.items():
            print(label, protocol, [(x["shots"], x["dice_mean"]) for x in sorted(rows, key=lambda x: x["shots"])])


if __name__ == "__main__":
    main()
