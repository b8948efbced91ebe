"""`metaapp evaluate clicks`: click corrections under the standard simulated-click protocol.

For each structure, repeat and query study, an annotator with k saved labels (k = 0: points alone)
opens the query study and clicks: each click at the voxel deepest inside the largest 3D error
region of what is shown, foreground or background by the error's sign. After each click the
server's code path runs (`core.clicks`: a copy of the head adapted to the clicks and the saved
labels, the clicked pieces kept) and the whole-volume Dice against the reference is recorded.

Methods, each with its own simulated clicks:
- `meta`: the product, the structure's head adapted on the k saved labels, then the clicks;
- `meta_refined` (with `refine_seconds`): the product once the structure's guarded refinement has
  run that long after the last save (the annotator's time on the next study): the clicks start from
  the version it serves, refined or still the quick head;
- `reset`: clicks on a head started from the points alone at every study (nothing learned from
  saved labels; it does not depend on k, and at k = 0 it is the product);
- `random_walker`: scikit-image's random walker on the study's intensities, seeded by the
  foreground clicks and by the background clicks plus the in-plane border of the volume.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from monailabel_metaapp.core.adaptation import DEFAULT_ADAPT_STEPS, SegAdapter, dice, probabilities_to_labels
from monailabel_metaapp.core.checkpoint import load_model, pick_device
from monailabel_metaapp.core.clicks import (
    Click,
    Corrections,
    apply_clicks,
    clicks_to_reach,
    next_click,
    saved_support,
)
from monailabel_metaapp.core.refine import REFINED
from monailabel_metaapp.core.volume import normalise_intensity, stack_to_original
from monailabel_metaapp.evaluate import EvalStudy, load_eval_studies, structure_labels
from monailabel_metaapp.evaluate_common import plot_curves
from monailabel_metaapp.evaluate_timeline import ANCHORS, served_after

LEVELS = (0.80, 0.85, 0.90)
METHODS = ("meta", "reset", "random_walker")


def spacing_zyx(study: EvalStudy) -> tuple[float, float, float]:
    return tuple(reversed(study.geom.reference.GetSpacing()))


class MetaClicks:
    """The app's click path on one study (`core.clicks.apply_clicks`), one click at a time.

    Args:
        adapter: the encoder's adapter.
        study: the open study.
        start: the structure's head adapted on its saved labels (None: points alone).
        saved: (features, masks) of the saved labels' support slices (None: no saved label).
    """

    def __init__(self, adapter: SegAdapter, study: EvalStudy, start, saved):
        self.adapter, self.study = adapter, study
        self.feats = adapter.embed(study.stack)
        self.state = Corrections(start, saved, start.one_piece if start is not None else True)

    def first(self) -> np.ndarray:
        """What the annotator sees on opening the study."""
        start = self.state.start
        if start is None:
            return np.zeros(self.study.ref.shape, bool)
        probs = self.adapter.predict(self.study.stack, [start], feats=self.feats)
        self.state.shown = probs[0] >= 0.5  # as the app keeps what its inference showed
        return probabilities_to_labels(stack_to_original(probs, self.study.geom), [1], one_piece=start.one_piece) == 1

    def click(self, c: Click) -> np.ndarray:
        return apply_clicks(self.adapter, self.study.stack, self.study.geom, self.feats, self.state, [c])


class RandomWalkerClicks:
    """scikit-image's random walker seeded by the clicks (and the in-plane border as background).

    Args:
        study: the open study.
    """

    def __init__(self, study: EvalStudy):
        self.image = normalise_intensity(sitk.GetArrayFromImage(study.geom.reference))
        self.spacing = spacing_zyx(study)
        self.clicks: list[Click] = []

    def first(self) -> np.ndarray:
        return np.zeros(self.image.shape, bool)

    def click(self, c: Click) -> np.ndarray:
        from skimage.segmentation import random_walker

        self.clicks.append(c)
        fg = [cl.ijk[::-1] for cl in self.clicks if cl.foreground]
        if not fg:
            return np.zeros(self.image.shape, bool)
        seeds = np.zeros(self.image.shape, np.uint8)
        seeds[:, [0, -1], :] = 2
        seeds[:, :, [0, -1]] = 2
        for cl in self.clicks:
            seeds[cl.ijk[::-1]] = 1 if cl.foreground else 2
        out = random_walker(self.image, seeds, beta=130, mode="cg_j", spacing=self.spacing, tol=1e-2)
        return out == 1


def run_clicks(session, ref: np.ndarray, spacing: tuple[float, float, float], n_clicks: int) -> tuple[list, list]:
    """Dice after 0..n_clicks simulated clicks, and the seconds of each click's correction.

    Args:
        session: a `MetaClicks` or `RandomWalkerClicks`.
        ref: (z, y, x) binary reference.
        spacing: voxel spacing in numpy order.
        n_clicks: clicks to simulate.
    """
    pred = session.first()
    dices, seconds = [dice(pred, ref)], []
    for _ in range(n_clicks):
        c = next_click(pred, ref, spacing)
        if c is None:
            dices.append(1.0)
            continue
        t0 = time.perf_counter()
        pred = session.click(c)
        seconds.append(time.perf_counter() - t0)
        dices.append(dice(pred, ref))
    return dices, seconds


def served_version(
    adapter: SegAdapter,
    support: list[EvalStudy],
    value: int,
    refine_seconds: float = 0.0,
    anchors: list[EvalStudy] | None = None,
    seed: int = 0,
    carry: dict | None = None,
):
    """(adapter, head, saved support) a correction starts from after k saved labels: the quick head as
    the app adapts it or, with `refine_seconds`, the version the guarded refinement serves after that
    long (with `carry`, the refinement goes on warm from the previous call's run, `served_after`); the
    saved labels' support slices (features, masks) are embedded by that version's encoder."""
    if not support:
        return adapter, None, None
    stacks = [s.stack for s in support]
    masks = [s.lstack == value for s in support]
    own, head = adapter, adapter.adapt(stacks, masks)
    if refine_seconds > 0:
        own, head = served_after(
            adapter,
            stacks,
            masks,
            head,
            refine_seconds,
            seed=seed,
            anchors=[s.stack for s in anchors or []],
            carry=carry,
        )
    return own, head, saved_support(own, masks, lambda n, idx: own.embed(stacks[n], idx))


def evaluate_clicks(
    studies: str | Path,
    shots: list[int],
    clicks: int = 10,
    labels: dict[str, int] | None = None,
    model: str | None = None,
    repeats: int = 2,
    queries: int = 3,
    methods: list[str] | None = None,
    seed: int = 0,
    device: str = "auto",
    refine_seconds: float = 0.0,
) -> dict:
    """Dice after each click and NoC@80/85/90 per structure, k and method (see the module's doc)."""
    dev = pick_device(device)
    adapter = SegAdapter(load_model(model, dev), dev, steps=DEFAULT_ADAPT_STEPS)
    data = load_eval_studies(studies, adapter.size)
    labels = labels or structure_labels(studies, data)
    methods = list(methods or METHODS) + (["meta_refined"] if refine_seconds > 0 else [])
    curves: dict[tuple, list[list[float]]] = {}
    stages: dict[tuple, list[str]] = {}
    seconds: dict[str, list[float]] = {}
    bar = tqdm(total=len(labels) * repeats * queries, desc="clicks", unit="query")
    for name, v in labels.items():
        pool = [s for s in data if (s.ref == v).any()]
        for r in range(repeats):
            order = random.Random(f"{seed}-{v}-{r}").sample(pool, len(pool))
            query = order[max(shots) : max(shots) + queries]
            anchors = order[max(shots) + queries : max(shots) + queries + ANCHORS]
            starts = {("meta", k): served_version(adapter, order[:k], v) for k in shots if "meta" in methods}
            if "meta_refined" in methods:
                for k in (k for k in shots if k):
                    starts["meta_refined", k] = served_version(adapter, order[:k], v, refine_seconds, anchors, seed + r)
                    stages.setdefault((name, k), []).append(starts["meta_refined", k][1].stage)
            for q in query:
                ref = q.ref == v
                sp = spacing_zyx(q)
                base = {}
                if "reset" in methods:
                    base["reset"] = run_clicks(MetaClicks(adapter, q, None, None), ref, sp, clicks)
                if "random_walker" in methods:
                    base["random_walker"] = run_clicks(RandomWalkerClicks(q), ref, sp, clicks)
                for k in shots:
                    runs = dict(base)
                    if "meta" in methods and k == 0 and "reset" in runs:
                        runs["meta"] = runs["reset"]  # points alone: the product is the reset head
                    for method in ("meta", "meta_refined"):
                        if (method, k) in starts and method not in runs:
                            own, head, saved = starts[method, k]
                            runs[method] = run_clicks(MetaClicks(own, q, head, saved), ref, sp, clicks)
                    for method, (d, sec) in runs.items():
                        curves.setdefault((name, k, method), []).append(d)
                        seconds.setdefault(method, []).extend(sec)
                bar.update(1)
    bar.close()
    rows, noc = [], []
    for (name, k, method), ds in curves.items():
        arr = np.asarray(ds)
        for c in range(arr.shape[1]):
            rows.append(
                {
                    "structure": name,
                    "shots": k,
                    "method": method,
                    "clicks": c,
                    "dice_mean": round(float(arr[:, c].mean()), 4),
                    "dice_std": round(float(arr[:, c].std()), 4),
                    "n": int(arr.shape[0]),
                }
            )
        for level in LEVELS:
            nocs = [clicks_to_reach(list(d), level, clicks) for d in ds]
            noc.append(
                {"structure": name, "shots": k, "method": method, "level": level, "noc_mean": statistics.fmean(nocs)}
            )
    settings = {
        "studies": str(studies),
        "shots": shots,
        "clicks": clicks,
        "labels": labels,
        "model": model or "shipped",
        "repeats": repeats,
        "queries": queries,
        "methods": methods,
        "seed": seed,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "refine_seconds": refine_seconds,
    }
    per_click = {m: round(statistics.median(s), 3) for m, s in seconds.items() if s}
    served = [
        {"structure": name, "shots": k, "method": "meta_refined", "refined": st.count(REFINED), "n": len(st)}
        for (name, k), st in stages.items()
    ]
    return {"settings": settings, "rows": rows, "noc": noc, "served": served, "median_seconds_per_click": per_click}


def simulate_annotator(
    studies: str | Path,
    n_studies: int = 6,
    cap: int = 20,
    target: float = 0.90,
    labels: dict[str, int] | None = None,
    model: str | None = None,
    repeats: int = 2,
    seed: int = 0,
    device: str = "auto",
    refine_seconds: float = 0.0,
) -> list[dict]:
    """The annotation loop with clicks: study after study, the annotator opens the structure's
    prediction from the labels saved so far, clicks until Dice reaches `target` (or `cap` clicks),
    then saves the finished label, which the next study's head learns from. With `refine_seconds`,
    the same loop again (method `meta_refined`) where the structure's refinement runs that long after
    each save, going on warm from its run over the labels saved before, as the app's does. Rows: one
    per structure, method, repeat and study, with the clicks it took."""
    dev = pick_device(device)
    adapter = SegAdapter(load_model(model, dev), dev, steps=DEFAULT_ADAPT_STEPS)
    data = load_eval_studies(studies, adapter.size)
    labels = labels or structure_labels(studies, data)
    rows = []
    methods = {"meta": 0.0} | ({"meta_refined": refine_seconds} if refine_seconds > 0 else {})
    bar = tqdm(total=len(labels) * repeats * n_studies * len(methods), desc="annotator", unit="study")
    for (name, v), (method, seconds) in itertools.product(labels.items(), methods.items()):
        pool = [s for s in data if (s.ref == v).any()]
        for r in range(repeats):
            order = random.Random(f"{seed}-annotator-{v}-{r}").sample(pool, min(n_studies, len(pool)))
            anchors = [s for s in pool if s not in order][:ANCHORS]
            carry: dict = {}  # the refinement's state from one save to the next
            for i, q in enumerate(order):
                own, head, saved = served_version(adapter, order[:i], v, seconds, anchors, seed + r, carry)
                session = MetaClicks(own, q, head, saved)
                ref, sp = q.ref == v, spacing_zyx(q)
                pred = session.first()
                dices = [dice(pred, ref)]
                while dices[-1] < target and len(dices) <= cap:
                    c = next_click(pred, ref, sp)
                    pred = session.click(c)
                    dices.append(dice(pred, ref))
                row = {
                    "structure": name,
                    "method": method,
                    "repeat": r,
                    "study": i + 1,
                    "saved_labels": i,
                    "stage": head.stage if head is not None else "points alone",
                    "clicks": clicks_to_reach(dices, target, cap),
                    "dice_opened": round(dices[0], 4),
                    "dice_saved": round(dices[-1], 4),
                }
                if head is not None and head.stage == REFINED:  # what the quick head would have opened with
                    quick = adapter.adapt([s.stack for s in order[:i]], [s.lstack == v for s in order[:i]])
                    row["dice_opened_head"] = round(dice(MetaClicks(adapter, q, quick, None).first(), ref), 4)
                rows.append(row)
                bar.update(1)
    bar.close()
    return rows


def plot_clicks(result: dict, png: Path) -> None:
    """Dice against clicks: one panel per structure and k, one curve per method."""
    rows = [r | {"panel": f"{r['structure']}, k={r['shots']}"} for r in result["rows"]]
    ncols = len(result["settings"]["shots"])
    plot_curves(
        rows,
        png,
        "dice_mean",
        "dice_std",
        "Dice",
        "clicks",
        "panel",
        "Dice after each click",
        x="clicks",
        ylim=(0, 1),
        ncols=ncols,
    )


def plot_annotator(rows: list[dict], png: Path) -> None:
    """Clicks per study along the annotation sequence: one panel per structure, one curve per method."""
    by: dict[tuple, list[int]] = {}
    for r in rows:
        by.setdefault((r["structure"], r.get("method", "meta"), r["study"]), []).append(r["clicks"])
    curve = [
        {"structure": n, "method": m, "shots": s, "clicks_mean": statistics.fmean(c), "clicks_std": float(np.std(c))}
        for (n, m, s), c in sorted(by.items())
    ]
    plot_curves(
        curve, png, "clicks_mean", "clicks_std", "clicks to the target Dice", "study in the sequence", "structure"
    )


def run_from_args(a) -> None:
    """`metaapp evaluate clicks`: the click curves and NoC (JSON + PNG at --out); with --annotator N,
    also the annotation loop over N studies (`<out>_annotator.json/.png`)."""
    import json

    from monailabel_metaapp.evaluate_common import int_list, name_list, write_result
    from monailabel_metaapp.provenance import SHIPPED_SEG, stamp

    if not a.studies:
        raise ValueError("evaluate clicks needs --studies DIR (a datastore folder with final labels)")
    labels = json.loads(a.labels) if a.labels else None
    res = evaluate_clicks(
        a.studies,
        int_list(a.shots),
        a.clicks,
        labels,
        a.model,
        a.repeats,
        a.queries,
        ["meta", *name_list(a.baselines, "reset,random_walker")],
        a.seed,
        a.device,
        a.refine_seconds,
    )
    if not res["rows"]:
        raise ValueError(f"no structure is in more than max(--shots) = {max(int_list(a.shots))} labelled studies")
    res["provenance"] = stamp([a.model or SHIPPED_SEG])
    write_result(res, a.out, plot_clicks)
    for n in res["noc"]:
        if n["level"] == 0.85:
            print(f"{n['structure']:>20} k={n['shots']} {n['method']:>13}: NoC@85 {n['noc_mean']:.1f}")
    if a.annotator:
        rows = simulate_annotator(
            a.studies, a.annotator, a.cap, 0.90, labels, a.model, a.repeats, a.seed, a.device, a.refine_seconds
        )
        out = Path(a.out).with_name(Path(a.out).stem + "_annotator.json")
        settings = {
            "studies": str(a.studies),
            "n_studies": a.annotator,
            "cap": a.cap,
            "target": 0.90,
            "seed": a.seed,
            "refine_seconds": a.refine_seconds,
        }
        result = {"settings": settings, "rows": rows, "provenance": stamp([a.model or SHIPPED_SEG])}
        write_result(result, out, lambda r, png: plot_annotator(r["rows"], png))
        print(f"annotation loop: {out}")
