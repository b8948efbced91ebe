"""With one labelled study, does fine-tuning end to end make the network better or worse on new
studies, and does distillation from the quick head on unlabelled studies of the site keep it from
collapsing?

Fine-tuning on the one labelled study lifts structures the encoder never saw and sinks some it knows
(`one_label_signals.py`). For one structure, each variant fine-tunes the meta-learned network and its
quick head on that study (`core.refine.Refinement(guard=False)` with the variant's settings) and is
scored every `--every` steps (`--clock seconds`: seconds of its own compute) by its mean Dice on
query studies. A variant sets `RefineConfig` fields
over their defaults (distillation is on by default): `distill=0` fits the label alone, `distill=1`
also pulls the candidate's predictions on 3 unlabelled anchor studies towards the quick head's.
Draws as in `metaapp evaluate seg --timeline` (`--draw 0` is repeat 0).

    python benchmarks/experiments/one_label_distill.py --studies DIR --structure 600 [--model FILE]
        [--draw 0] [--queries 4] [--steps 150] [--every 30] [--clock steps|seconds]
        --variant base=distill=0 --variant kd1=distill=1 --out t.json
    python benchmarks/experiments/one_label_distill.py --combine a.json b.json ... --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from one_label_signals import one_label_draw  # noqa: E402
from tqdm import tqdm  # noqa: E402

from monailabel_metaapp.core.adaptation import SegAdapter  # noqa: E402
from monailabel_metaapp.core.refine import RefineConfig, Refinement  # noqa: E402
from monailabel_metaapp.evaluate import mean_query_dice  # noqa: E402
from monailabel_metaapp.provenance import SHIPPED_SEG, stamp  # noqa: E402


def parse_variant(text: str) -> tuple[str, RefineConfig]:
    """'name=key=value,key=value' -> (name, the RefineConfig with those fields set)."""
    name, _, rest = text.partition("=")
    return name, RefineConfig.parse(rest)


def run(a: argparse.Namespace) -> dict:
    base, support, query, anchors, mask, quick = one_label_draw(a.studies, a.structure, a.model, a.queries, a.draw)

    def query_dice(ad: SegAdapter, head) -> float:
        return mean_query_dice(ad, head, query, a.structure)

    head0 = query_dice(base, quick)
    curves = {}
    for text in a.variant:
        name, cfg = parse_variant(text)
        torch.manual_seed(0)
        ft = Refinement(base, [support.stack], [mask], quick, cfg, seed=0, guard=False, anchors=anchors)
        rows = [{"steps": 0, "seconds": 0.0, "query": head0}]
        for n in tqdm(range(1, a.steps // a.every + 1), desc=f"{a.structure} {name}", unit="checkpoint"):
            while (ft.seconds if a.clock == "seconds" else ft.steps) < n * a.every:
                ft.step()
            ft.model.encoder.net.eval()
            rows.append({"steps": ft.steps, "query": query_dice(ft.adapter, ft.head()), "seconds": ft.seconds})
            ft.model.encoder.net.train()
        fields = {k: v for k, v in cfg.to_dict().items() if v != getattr(RefineConfig, k)}
        curves[name] = {"fields": fields, "config": cfg.to_dict(), "rows": rows}
    settings = {k: getattr(a, k) for k in ("studies", "structure", "draw", "queries", "steps", "every", "clock")}
    settings["model"] = a.model or "shipped"
    return {"settings": settings, "curves": curves, "provenance": stamp([a.model] if a.model else [SHIPPED_SEG])}


def combine(files: list[Path], out: Path) -> None:
    """One panel and one summary row per model, structure and draw; traces of the same one (variants
    run in separate processes) are merged."""
    traces: dict[str, dict] = {}
    for f in files:
        t = json.loads(Path(f).read_text())
        st = t["settings"]
        name = f"{Path(st['model']).stem} / {st['structure']} / draw {st['draw']}"
        if name in traces:
            traces[name]["curves"] |= t["curves"]
            traces[name]["file"] += f", {Path(f).name}"
        else:
            traces[name] = t | {"file": Path(f).name}
    fig, axes = plt.subplots(1, len(traces), figsize=(3.2 * len(traces), 3.2), squeeze=False)
    summary = []
    for (name, t), ax in zip(traces.items(), axes[0]):
        st = t["settings"]
        row = {"trace": t["file"], "name": name}
        for v, c in t["curves"].items():
            q = [r["query"] for r in c["rows"]]
            clock = st.get("clock", "steps")
            ax.plot([r[clock] for r in c["rows"]], q, marker=".", label=v)
            row[v] = {"first": q[0], "last": q[-1], "min": min(q), "max": max(q)}
        summary.append(row)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel(f"{clock} on the one study")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("query Dice")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "distill.png", dpi=110)
    weights = sorted({w for t in traces.values() for w in t["provenance"]["weights"]})
    (out / "distill.json").write_text(json.dumps({"summary": summary, "provenance": stamp(weights)}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies")
    ap.add_argument("--structure", type=int)
    ap.add_argument("--model", help="meta-trained weights (default: the shipped model)")
    ap.add_argument("--draw", type=int, default=0)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=30)
    ap.add_argument(
        "--clock", choices=["steps", "seconds"], default="steps", help="--steps and --every count steps or seconds"
    )
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--combine", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.combine:
        combine(a.combine, a.out)
        return
    if not a.studies or a.structure is None or not a.variant:
        ap.error("give --studies, --structure and --variant (one trace) or --combine")
    torch.set_num_threads(1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(run(a), indent=1))


if __name__ == "__main__":
    main()
