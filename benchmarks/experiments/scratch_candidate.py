"""With one labelled study of a structure the encoder never saw, does the guard serve more when a UNet
trained from scratch competes with the fine-tuned meta-learned network for publication?

On a held-out structure a UNet from random init overtakes refinement by 150 s (the RV blood pool
fold: scratch 0.63-0.68 against 0.39-0.50), but it is all or nothing: on other cells it never leaves
its empty prediction. The guard already tells a better version from a worse one on data held out from
the structure's own label, so the app could train both and serve whichever the guard prefers. The
price is compute: each gets half of the seconds.

Methods, on one thread, marks in process CPU seconds after the save (each method's own compute,
validations included; scoring on the query studies is not counted), scored at each mark by the mean
whole-volume Dice over the query studies of what is served:
* `app`: what the app serves today: the quick head, then `core.refine.Refinement` (guarded: the
  middle third of the support's slices holding the structure held out, the quick head as teacher on
  the anchor studies) publishing each candidate that passes the guard (`--refine` changes its
  settings, e.g. `min_agreement=0` drops the agreement check; with two starts each row also gives
  each run's seconds so far, `seconds_warm` and `seconds_fresh`);
* `scratch`: `evaluate.ScratchTrainer` on every slice of the support, served as it is at each mark
  (no guard: the timeline's baseline);
* `both`: the app's refinement and a `ScratchTrainer` on the same training slices (the held-out block
  left out) take turns by compute; a scratch candidate is checked every `--scratch-every` steps by the
  same guard (held-out Dice above the best so far by `min_gain`, agreement with the quick head on the
  anchors), and the guard's best so far is shared, so a candidate of either kind must beat both;
* `trace` (not served): a `ScratchTrainer` on the same training slices; every 2 x `--scratch-every`
  steps its held-out Dice, its agreement with the quick head on the anchors and its query Dice are
  recorded in `checks` (the guard's agreement bar: `head_bar`).
Draws as in `metaapp evaluate seg --timeline` (`--draws 0` is the timeline's repeat 0).

    OMP_NUM_THREADS=1 python benchmarks/experiments/scratch_candidate.py --studies DIR --structure 600
        --model FOLD.pt [--shots 1] [--draws 0,1,2] [--queries 4] [--marks 10,30,60,150]
        [--methods scratch,app,both,trace] [--scratch-agreement 1] [--refine min_agreement=0] --out F.json
    ... --combine A.json B.json --out F.json   (merge per-draw files)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from one_label_signals import one_label_draw  # noqa: E402

from monailabel_metaapp.core.refine import (  # noqa: E402
    RefineConfig,
    Refinement,
    TwoStartRefinement,
    agreement_needed,
    pooled_dice,
    refined_adapter,
    start_refinement,
)
from monailabel_metaapp.evaluate import (  # noqa: E402
    ScratchTrainer,
    _probs_to_mask,
    dice,
    draw_order,
    mean_query_dice,
    setup,
)
from monailabel_metaapp.evaluate_common import int_list, write_result  # noqa: E402
from monailabel_metaapp.evaluate_timeline import ANCHORS  # noqa: E402
from monailabel_metaapp.provenance import SHIPPED_SEG  # noqa: E402


class Served:
    """What the app would serve: the quick head, a published refined version or a published scratch net."""

    def __init__(self, ad, quick, query, value: int) -> None:
        self.ad, self.quick, self.query, self.value = ad, quick, query, value
        self.kind, self.payload, self.start = "head", None, None

    def publish_refined(self, run: Refinement | TwoStartRefinement) -> None:
        self.kind, self.payload, self.start = "refined", (run.encoder_state(), run.head()), run.start

    def publish_scratch(self, trainer: ScratchTrainer) -> None:
        self.kind, self.payload = "scratch", copy.deepcopy(trainer.net.state_dict())

    def dice(self, scratch_like: ScratchTrainer | None = None) -> float:
        if self.kind == "head":
            return mean_query_dice(self.ad, self.quick, self.query, self.value)
        if self.kind == "refined":
            encoder, head = self.payload
            return mean_query_dice(refined_adapter(self.ad, encoder), head, self.query, self.value)
        net = copy.deepcopy(scratch_like)
        net.net.load_state_dict(self.payload)
        return scratch_dice(net, self.query, self.value, self.quick.one_piece)


def scratch_dice(trainer: ScratchTrainer, query, value: int, one_piece: bool) -> float:
    preds = [_probs_to_mask(trainer.predict(q.stack), q.geom, one_piece) for q in query]
    return sum(dice(p, q.ref == value) for p, q in zip(preds, query)) / len(query)


def scratch_guard(run: Refinement, trainer: ScratchTrainer, agreement: bool) -> tuple[float, float | None, bool]:
    """The refinement's guard applied to a scratch net: (held-out Dice, agreement with the quick head
    on the anchors or None when not checked, publish?)."""
    probs, refs = [], []
    for stack, mask, idx in zip(run.stacks, run.masks, run.val_idx):
        if idx:
            probs.append(trainer.predict(stack[idx])[0])
            refs.append(mask[idx])
    d = pooled_dice(probs, refs)
    better, agree = d >= run.best + run.cfg.min_gain, None
    if better and run.anchors and agreement:
        agree = sum(pooled_dice([trainer.predict(st)[0]], [ref]) for st, ref in run.anchors) / len(run.anchors)
        better = agree >= agreement_needed(run.baseline, run.cfg.min_agreement)
    return d, agree, better


def draw_studies(studies: str, value: int, model: str, shots: int, queries: int, draw: int):
    """(adapter, support studies, query studies, anchor stacks, support masks, quick head) of one draw of
    `metaapp evaluate seg --timeline` (`draw` is its repeat)."""
    if shots == 1:
        ad, support, query, anchors, mask, quick = one_label_draw(studies, value, model, queries, draw)
        return ad, [support], query, anchors, [mask], quick
    _, ad, data, _ = setup(studies, {"s": value}, model, "cpu")
    pool = [s for s in data if (s.ref == value).any()]
    order = draw_order(pool, 0, value, shots, draw)
    support, query = order[:shots], order[shots : shots + queries]
    anchors = [s.stack for s in order[shots + queries : shots + queries + ANCHORS]]
    masks = [s.lstack == value for s in support]
    return ad, support, query, anchors, masks, ad.adapt([s.stack for s in support], masks)


def run_draw(
    studies: str,
    value: int,
    model: str,
    shots: int,
    queries: int,
    draw: int,
    marks: list[float],
    scratch_every: int,
    methods: list[str],
    agreement: bool,
    cfg: RefineConfig,
) -> tuple[list[dict], list[dict]]:
    ad, support, query, anchors, masks, quick = draw_studies(studies, value, model, shots, queries, draw)
    stacks = [s.stack for s in support]
    head_dice = mean_query_dice(ad, quick, query, value)
    rows = [{"draw": draw, "method": "quick head", "seconds": 0.0, "dice": head_dice, "served": "head"}]
    guard = Refinement(ad, stacks, masks, quick, cfg, seed=draw, anchors=anchors)
    rows[0].update(head_held_out=guard.baseline, head_bar=agreement_needed(guard.baseline, guard.cfg.min_agreement))
    checks = []  # every check of a scratch candidate by the guard in `both`
    print(f"draw {draw}: quick head {head_dice:.3f}", flush=True)

    def record(method: str, mark: float, d: float, served: str, **extra) -> None:
        rows.append({"draw": draw, "method": method, "seconds": mark, "dice": d, "served": served, **extra})
        print(f"draw {draw}: {method} {mark:.0f} s {d:.3f} ({served}) {extra}", flush=True)

    # scratch alone, on every slice of the support, served as it is
    scratch = ScratchTrainer(stacks, masks, ad.device, draw)
    clock, pending = 0.0, sorted(marks) if "scratch" in methods else []
    while pending:
        t0 = time.process_time()
        scratch.step()
        clock += time.process_time() - t0
        while pending and clock >= pending[0]:
            record("scratch", pending.pop(0), scratch_dice(scratch, query, value, quick.one_piece), "scratch")

    # the app: guarded refinement (as the app runs it for `cfg`), each candidate that passes goes live
    run = start_refinement(ad, stacks, masks, quick, cfg, seed=draw, anchors=anchors)
    served = Served(ad, quick, query, value)
    clock, pending = 0.0, sorted(marks) if "app" in methods else []
    while pending:
        t0 = time.process_time()
        result = run.advance()
        if result is not None and result[1]:
            served.publish_refined(run)
        clock += time.process_time() - t0
        while pending and clock >= pending[0]:
            split = {f"seconds_{k}": round(r.seconds, 1) for k, r in getattr(run, "runs", {}).items()}
            record("app", pending.pop(0), served.dice(), served.kind, start=served.start, **split)

    # both: refinement and a scratch net on the same training slices take turns, one guard
    run = Refinement(ad, stacks, masks, quick, cfg, seed=draw, anchors=anchors)
    keep = [j for j, idx in enumerate(run.train_idx) if idx]
    trainer = ScratchTrainer(
        [stacks[j][run.train_idx[j]] for j in keep], [masks[j][run.train_idx[j]] for j in keep], ad.device, draw
    )
    served = Served(ad, quick, query, value)
    clocks = {"refined": 0.0, "scratch": 0.0}
    pending = sorted(marks) if "both" in methods else []
    scratch_steps, published = 0, {"refined": 0, "scratch": 0}
    while pending:
        turn = min(clocks, key=clocks.get)
        t0 = time.process_time()
        if turn == "refined":
            result = run.advance()
            if result is not None and result[1]:
                served.publish_refined(run)
                published["refined"] += 1
        else:
            trainer.step()
            scratch_steps += 1
            if scratch_steps % scratch_every == 0:
                d, agree, better = scratch_guard(run, trainer, agreement)
                checks.append(
                    {
                        "draw": draw,
                        "clock": round(sum(clocks.values()), 1),
                        "held_out": d,
                        "agreement": agree,
                        "best_before": run.best,
                        "published": better,
                    }
                )
                if better:
                    run.best = d
                    served.publish_scratch(trainer)
                    published["scratch"] += 1
        clocks[turn] += time.process_time() - t0
        while pending and sum(clocks.values()) >= pending[0]:
            record("both", pending.pop(0), served.dice(trainer), served.kind, published=dict(published))

    # trace: what the guard sees of a scratch net on its training slices, beside its query Dice
    trainer = ScratchTrainer(
        [stacks[j][run.train_idx[j]] for j in keep], [masks[j][run.train_idx[j]] for j in keep], ad.device, draw
    )
    clock, steps = 0.0, 0
    while "trace" in methods and clock < max(marks):
        t0 = time.process_time()
        trainer.step()
        clock += time.process_time() - t0
        steps += 1
        if steps % (2 * scratch_every) == 0:
            probs, refs = zip(*[(trainer.predict(st[i])[0], m[i]) for st, m, i in zip(stacks, masks, run.val_idx) if i])
            agree = sum(pooled_dice([trainer.predict(st)[0]], [ref]) for st, ref in run.anchors) / len(run.anchors)
            q = scratch_dice(trainer, query, value, quick.one_piece)
            trace = {"held_out": pooled_dice(list(probs), list(refs)), "agreement": agree, "query": q}
            checks.append({"draw": draw, "method": "trace", "clock": round(clock, 1), "steps": steps, **trace})
            print(f"draw {draw}: trace {clock:.0f} s {trace}", flush=True)
    return rows, checks


def mean_at(rows: list[dict], method: str, mark: float) -> float:
    vals = [r["dice"] for r in rows if r["method"] == method and r["seconds"] == mark]
    return sum(vals) / len(vals)


def plot(result: dict, png: Path) -> None:
    """Served Dice against seconds; with a trace, the guard's view of the scratch UNet beside its query Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = result["rows"], result["settings"]
    trace = [c for c in result.get("checks", []) if c.get("method") == "trace"]
    if trace:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key in zip(axes, ("held_out", "agreement")):
            for d in sorted({c["draw"] for c in trace}):
                pts = [c for c in trace if c["draw"] == d]
                ax.scatter([c[key] for c in pts], [c["query"] for c in pts], label=f"draw {d}", s=18)
            ax.set_xlabel({"held_out": "Dice on the held-out block", "agreement": "agreement with the quick head"}[key])
            ax.set_ylabel("mean query Dice")
        bars = [r["head_bar"] for r in rows if r["method"] == "quick head"]
        axes[1].axvline(min(bars), color="grey", ls=":", label="agreement bar (lowest)")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"scratch UNet, one label, structure {s['structure']}: what the guard sees", fontsize=9)
    else:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.axhline(mean_at(rows, "quick head", 0.0), color="grey", ls=":", label="quick head")
        for method in ("app", "scratch", "both"):
            marks = sorted({r["seconds"] for r in rows if r["method"] == method})
            if marks:
                ax.plot(marks, [mean_at(rows, method, m) for m in marks], "o-", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("seconds of compute on one core after the save")
        ax.set_ylabel("mean query Dice of what is served")
        ax.set_title(f"k = {s.get('shots', 1)}, structure {s['structure']}, draws {s['draws']}", fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", required=True)
    ap.add_argument("--structure", type=int, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--draws", type=int_list, default=[0, 1, 2])
    ap.add_argument("--shots", type=int, default=1, help="labelled studies of the structure (k)")
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--methods", default="scratch,app,both")
    ap.add_argument("--scratch-agreement", type=int, default=1, help="0: scratch candidates skip the agreement check")
    ap.add_argument("--marks", default="10,30,60,150")
    ap.add_argument(
        "--refine", default="", help="refinement settings as for `--refine` of the timeline, e.g. min_agreement=0"
    )
    ap.add_argument("--scratch-every", type=int, default=40, help="scratch steps between two checks by the guard")
    ap.add_argument("--combine", nargs="*", type=Path, help="merge the rows of earlier JSON files instead of running")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    marks = [float(m) for m in a.marks.split(",")]
    settings = {
        "studies": a.studies,
        "structure": a.structure,
        "model": a.model,
        "draws": a.draws,
        "shots": a.shots,
        "queries": a.queries,
        "scratch_every": a.scratch_every,
        "scratch_agreement": bool(a.scratch_agreement),
        "refine": RefineConfig.parse(a.refine).to_dict(),
    }
    if a.combine:
        parts = [json.loads(p.read_text()) for p in a.combine]
        rows = [r for p in parts for r in p["rows"]]
        checks = [c for p in parts for c in p.get("checks", [])]
        settings["draws"] = sorted({r["draw"] for r in rows})
        settings["runs"] = [p.get("provenance") for p in parts]  # each draw's commit, weights and command
    else:
        rows, checks = [], []
        for d in a.draws:
            args = (
                a.shots,
                a.queries,
                d,
                marks,
                a.scratch_every,
                a.methods.split(","),
                bool(a.scratch_agreement),
                RefineConfig.parse(a.refine),
            )
            r, c = run_draw(a.studies, a.structure, a.model, *args)
            rows, checks = rows + r, checks + c
    write_result({"settings": settings, "rows": rows, "checks": checks}, a.out, plot, weights=[a.model or SHIPPED_SEG])


if __name__ == "__main__":
    main()
