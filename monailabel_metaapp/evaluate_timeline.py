"""`metaapp evaluate seg --timeline 2,10,30,60,150,300`: the Dice of what the app would serve at each
number of seconds after a save, against baselines given the same seconds on the same support.

Methods, each with its own clock (the compute it has spent: `compute_seconds`), advanced in turn, so
that a busy machine neither favours one nor shortens what any of them gets:
  * `meta`: what the app serves. The quick head (its adaptation time starts the clock), then the
    guarded refinement of `core/refine.py`; a refined version is served from the moment it passes
    the guard.
  * `candidate`: the guarded refinement's current network, served or not (it tells whether the guard
    held back a version that was better on new studies).
  * `finetune`: the meta-trained network fine-tuned end to end on every support slice, no guard.
  * `scratch`: a MONAI UNet from random init on the same support (as `evaluate seg`).
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

from monailabel_metaapp.core.adaptation import SegAdapter, dice
from monailabel_metaapp.core.refine import (
    REFINED,
    RefineConfig,
    Refinement,
    TwoStartRefinement,
    refined_adapter,
    start_refinement,
)
from monailabel_metaapp.evaluate import ScratchTrainer, _probs_to_mask, dice_row, draw_order, setup
from monailabel_metaapp.evaluate_common import plot_curves
from monailabel_metaapp.provenance import SHIPPED_SEG, stamp

ANCHORS = 3  # other studies (neither support nor query) the guard checks agreement on, as the app does


def _copy_net(run: Refinement | TwoStartRefinement) -> tuple[dict, object]:
    return run.encoder_state(), run.head()


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def compute_seconds() -> float:
    """Seconds of this process's compute: its CPU time over its torch threads. On an otherwise idle
    machine this is wall time; on a busy one it still counts only what each method got to run."""
    return time.process_time() / max(1, torch.get_num_threads())


class _Clocked:
    """One method under test: its clock, its next step, and what it would serve now."""

    def __init__(self, name: str, start: float, step, serve):
        self.name, self.clock, self._step, self._serve = name, start, step, serve

    def step(self) -> None:
        t0 = compute_seconds()
        self._step()
        self.clock += compute_seconds() - t0

    def serve(self):
        return self._serve()


def timeline_episode(
    adapter: SegAdapter,
    stacks: list[torch.Tensor],
    masks: list[torch.Tensor],
    marks: list[float],
    seed: int,
    cfg: RefineConfig,
    anchors: list[torch.Tensor] | None = None,
) -> tuple[dict[tuple[str, float], object], dict]:
    """Run every method up to the last mark on one support; return (method, mark) -> what is served
    (("head"|"net", weights...) or the scratch trainer's state) and the guard's record. `anchors` are
    other studies' images (the guard's agreement check), as the app takes them from its datastore."""
    # the app has every study's embeddings cached from inference and active-learning scoring
    feats = [adapter.embed(st) for st in stacks]
    anchor_feats = [adapter.embed(st) for st in anchors or []]
    t0 = compute_seconds()
    head = adapter.adapt(stacks, masks, feats=feats)
    head_seconds = compute_seconds() - t0
    t0 = compute_seconds()  # the app builds the guard after the save too: its seconds count
    guarded = start_refinement(
        adapter, stacks, masks, head, cfg, seed=seed, anchors=anchors, feats=feats, anchor_feats=anchor_feats
    )
    build_seconds = compute_seconds() - t0
    served: dict = {"version": ("head", None, head)}
    record = {
        "published": [],
        "validations": 0,
        "head_val_dice": guarded.baseline,
        "head_seconds": head_seconds,
        "build_seconds": build_seconds,
    }

    def guarded_step() -> None:
        result = guarded.advance()
        if result is not None:
            record["validations"] += 1
            if result[1]:
                enc, h = _copy_net(guarded)
                served["version"] = ("net", enc, h)
                record["published"].append(
                    {
                        "steps": guarded.steps,
                        "start": guarded.start,
                        "val_dice": round(result[0], 4),
                        "agreement": guarded.agreement,
                    }
                )
            elif guarded.agreement is not None:  # better on the held-out slices, refused by the anchors
                record.setdefault("refused_disagreeing", []).append(
                    {"steps": guarded.steps, "val_dice": round(result[0], 4), "agreement": round(guarded.agreement, 4)}
                )

    free = Refinement(adapter, stacks, masks, head, cfg, seed=seed, guard=False)

    def meta_step() -> None:
        if guarded.checkable:
            guarded_step()
        else:  # no labelled slice to check on: the app does not refine, the quick head is served throughout
            meta.clock = max(marks)

    scratch = ScratchTrainer(stacks, masks, adapter.device, seed, bf16=cfg.bf16)
    meta = _Clocked("meta", head_seconds + build_seconds, meta_step, lambda: served["version"])
    clocks = [
        meta,
        _Clocked("finetune", head_seconds, free.step, lambda: ("net", *_copy_net(free))),
        _Clocked(
            "scratch",
            0.0,
            scratch.step,
            lambda: ("scratch", {k: v.clone() for k, v in scratch.net.state_dict().items()}),
        ),
    ]
    out: dict = {}
    pending = {c.name: sorted(marks) for c in clocks}
    while any(pending.values()):
        for c in clocks:  # a mark already passed is served as it stood then
            while pending[c.name] and c.clock >= pending[c.name][0]:
                mark = pending[c.name].pop(0)
                out[(c.name, mark)] = c.serve()
                if c.name == "meta" and guarded.checkable:
                    out[("candidate", mark)] = ("net", *_copy_net(guarded))
        active = [c for c in clocks if pending[c.name]]
        if active:
            min(active, key=lambda c: c.clock).step()
    return out, record


def served_after(
    adapter: SegAdapter,
    stacks: list[torch.Tensor],
    masks: list[torch.Tensor],
    head,
    seconds: float,
    cfg: RefineConfig | None = None,
    seed: int = 0,
    anchors: list[torch.Tensor] | None = None,
    carry: dict | None = None,
) -> tuple[SegAdapter, object]:
    """(adapter, head) the app serves once the structure's guarded refinement has run `seconds` of
    compute after the save: the last version that passed the guard (its head's `stage` "refined"), or
    the quick head `head`. With `carry`, the run goes on warm from `carry["state"]` (a run over the
    labels before this save, as the app's does) and leaves its own state there."""
    state = (carry or {}).get("state")
    run = start_refinement(adapter, stacks, masks, head, cfg or RefineConfig(), seed=seed, state=state, anchors=anchors)
    served = (adapter, head)
    t0 = compute_seconds()
    while run.checkable and compute_seconds() - t0 < seconds:
        result = run.advance()
        if result is not None and result[1]:
            served = (refined_adapter(adapter, run.encoder_state()), run.head())
            served[1].stage = REFINED
    if carry is not None:
        carry["state"] = run.state_dict()
    return served


def _predict(adapter: SegAdapter, served, stack: torch.Tensor, scratch_net: ScratchTrainer) -> torch.Tensor:
    kind = served[0]
    if kind == "head":
        return adapter.predict(stack, [served[2]])
    if kind == "net":
        return refined_adapter(adapter, served[1]).predict(stack, [served[2]])
    scratch_net.net.load_state_dict(served[1])
    return scratch_net.predict(stack)


def evaluate_timeline(
    studies: str,
    shots: list[int],
    marks: list[float],
    labels: dict[str, int] | None = None,
    model: str | None = None,
    repeats: int = 1,
    queries: int = 5,
    seed: int = 0,
    device: str = "auto",
    cfg: RefineConfig | None = None,
) -> dict:
    """Dice of every method at every mark, per structure and k (see the module's docstring)."""
    cfg = cfg or RefineConfig()
    dev, adapter, data, labels = setup(studies, labels, model, device)
    results: dict[tuple, list[float]] = {}
    guard_log = []
    bar = tqdm(total=len(labels) * len(shots) * repeats, desc="timeline", unit="episode")
    for name, v in labels.items():
        pool = [s for s in data if (s.ref == v).any()]
        for k in shots:
            for r in range(repeats):
                if len(pool) < k + 1:
                    bar.update(1)
                    continue
                order = draw_order(pool, seed, v, k, r)
                support, query = order[:k], order[k : k + queries]
                anchors = [s.stack for s in order[k + queries : k + queries + ANCHORS]]
                masks = [s.lstack == v for s in support]
                served, record = timeline_episode(
                    adapter, [s.stack for s in support], masks, marks, seed + r, cfg, anchors
                )
                head = next(x[2] for x in served.values() if x[0] in ("head", "net"))
                scratch = ScratchTrainer([support[0].stack], [masks[0]], dev, 0)
                for (method, mark), what in served.items():
                    for q in query:
                        probs = _predict(adapter, what, q.stack, scratch)
                        pred = _probs_to_mask(probs, q.geom, head.one_piece)
                        results.setdefault((name, k, method, mark), []).append(dice(pred, q.ref == v))
                guard_log.append({"structure": name, "shots": k, "repeat": r, **record})
                bar.update(1)
    bar.close()
    rows = [dice_row(name, k, method, ds, seconds=mark) for (name, k, method, mark), ds in sorted(results.items())]
    settings = {
        "studies": str(studies),
        "shots": shots,
        "marks": marks,
        "labels": labels,
        "model": model or "shipped",
        "repeats": repeats,
        "queries": queries,
        "seed": seed,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "refine": cfg.to_dict(),
    }
    weights = [model] if model else [SHIPPED_SEG]
    return {"settings": settings, "rows": rows, "guard": guard_log, "provenance": stamp(weights)}


def plot_timeline(rows: list[dict], png, title: str = "") -> None:
    """Dice against seconds after the save: one panel per k, one line per method (mean and spread over
    structures)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["shots"], r["method"], r["seconds"]), []).append(r["dice_mean"])
    points = [
        {"panel": f"{k} labelled {'study' if k == 1 else 'studies'}", "method": m, "seconds": t}
        | {"dice": statistics.fmean(d), "spread": statistics.pstdev(d)}
        for (k, m, t), d in sorted(groups.items())
    ]
    plot_curves(
        points,
        png,
        "dice",
        "spread",
        "Dice on other studies",
        "seconds after the save",
        "panel",
        title,
        ylim=(0, 1),
        x="seconds",
        xscale="log",
    )
