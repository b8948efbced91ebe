"""`metaapp simulate-al`: the active-learning loop, for real, through the app's REST API.

For each repeat, a seeded split of the labelled studies into a held-out evaluation set and a pool;
one random pool study is the shared starting label. For each strategy, a fresh server runs on a
fresh datastore holding only the pool's images: the strategy picks a study ("Next Sample"), its
reference label is saved as Slicer saves it, the app adapts its head and refreshes its scores, and
Dice is measured on the evaluation studies through `/infer` (uploaded once as sessions). Output: a
JSON list `rows` of {strategy, labels, dice_mean, dice_std}, a summary per strategy (area under the
curve, labels needed to reach `random`'s final Dice) and a PNG of the curves.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk
from tqdm import tqdm

from monailabel_metaapp.core.adaptation import dice
from monailabel_metaapp.core.episodes import image_files, image_stem, label_names
from monailabel_metaapp.devserver import Server
from monailabel_metaapp.provenance import SHIPPED_SEG, stamp

MODEL = "fewshot_seg"


def image_ids(studies: Path) -> dict[str, Path]:
    """image id (file name without its suffix) -> file, for the images at the top of a datastore."""
    return {image_stem(p): p for p in image_files(studies)}


def resolve_structure(studies: Path, structure: str) -> tuple[str, int]:
    """NAME or VALUE -> (name, value) using the datastore's labels.json when it has one."""
    names = label_names(studies)  # value -> name
    if structure.isdigit():
        v = int(structure)
        return names.get(v, f"structure {v}"), v
    for v, n in names.items():
        if n == structure:
            return n, v
    raise ValueError(f"unknown structure {structure!r}; {studies}/labels.json names {sorted(names.values())}")


def reference_masks(studies: Path, value: int, out: Path) -> dict[str, Path]:
    """Binary (0/1) reference label of the structure for every study that has it."""
    out.mkdir(parents=True, exist_ok=True)
    refs = {}
    for image_id, img in image_ids(studies).items():
        lbl = studies / "labels" / "final" / img.name
        if not lbl.exists():
            continue
        ref = sitk.ReadImage(str(lbl))
        arr = (sitk.GetArrayFromImage(ref) == value).astype(np.uint8)
        if not arr.any():
            continue
        m = sitk.GetImageFromArray(arr)
        m.CopyInformation(ref)
        refs[image_id] = out / f"{image_id}.nii.gz"
        sitk.WriteImage(m, str(refs[image_id]), useCompression=True)
    return refs


class Loop:
    """One strategy, one repeat: a fresh server on a fresh datastore of the pool."""

    def __init__(
        self, root: Path, images: dict[str, Path], pool: list[str], name: str, value: int, seconds_per_study: float = 0
    ):
        self.seconds_per_study = seconds_per_study
        self.store = root / "store"
        self.store.mkdir(parents=True)
        for i in pool:
            (self.store / images[i].name).symlink_to(images[i].resolve())
        (self.store / "labels.json").write_text(json.dumps({name: value}))
        self.name, self.value = name, value
        # labels back to back: nothing learns in the background; with time between saves, refinement does
        conf = {"site_adapt": "false", "refine": "true" if seconds_per_study > 0 else "false"}
        self.server = Server(self.store, root / "server.log", conf).start()
        from monailabel.client import MONAILabelClient

        self.client = MONAILabelClient(self.server.url, tmpdir=str(root / "client"))
        (root / "client").mkdir()

    def status(self) -> dict:
        return requests.get(f"{self.server.url}/info/", timeout=30).json()["metaapp"][MODEL]

    def save(self, image_id: str, ref: Path, timeout: float = 600) -> None:
        """Save a label as Slicer's Submit Label does, then wait for the new head and fresh scores, and
        with `seconds_per_study`, until that long after the save (the annotator at the next study)."""
        v0 = self.status()["structures"].get(self.name, {}).get("version", 0)
        info = {"label_info": [{"name": self.name, "idx": 1}]}
        t0 = time.time()
        self.client.save_label(image_id, str(ref), params=info)
        try:
            self._wait_head(v0, timeout)
        finally:
            time.sleep(max(0.0, t0 + self.seconds_per_study - time.time()))

    def _wait_head(self, v0: int, timeout: float) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            st = self.status()
            head, al = st["structures"].get(self.name, {}), st["activelearning"]
            if head.get("version", 0) > v0 and head.get("state") == "ready" and al["state"] == "idle":
                if not al["pending"]:
                    return
            if head.get("state") == "failed":
                raise RuntimeError(f"adaptation failed: {head}")
            time.sleep(0.2)
        raise TimeoutError(f"no new head for {self.name} in {timeout} s:\n{self.server.log_tail()}")

    def evaluate(self, sessions: dict[str, str], refs: dict[str, Path]) -> float:
        scores = []
        for image_id, sid in sessions.items():
            out, params = self.client.infer(MODEL, image_id, {}, session_id=sid)
            pred = sitk.GetArrayFromImage(sitk.ReadImage(out))
            value = (params.get("label_names") or {}).get(self.name)
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(refs[image_id])))
            scores.append(dice(pred == value, ref > 0) if value is not None else 0.0)
            Path(out).unlink(missing_ok=True)
        return float(np.mean(scores))

    def close(self) -> None:
        self.server.stop()


@dataclass
class Setup:
    images: dict[str, Path]  # every study of the source datastore
    refs: dict[str, Path]  # binary reference label per study holding the structure
    name: str
    value: int
    budget: int
    seconds_per_study: float = 0.0  # from a save to the measurement and the next pick (refinement runs)


def run_one(
    root: Path, setup: Setup, pool: list[str], held: list[str], start: str, strategy: str, bar: tqdm
) -> tuple[list[float], list[str]]:
    """Dice after 1..budget labels for one strategy on a fresh server (the first label is `start`)."""
    images, refs, name, budget = setup.images, setup.refs, setup.name, setup.budget
    loop = Loop(root, images, pool, name, setup.value, setup.seconds_per_study)
    try:
        sessions = {i: loop.client.create_session(str(images[i]))["session_id"] for i in held}
        curve, picked, pick = [], [], start
        while pick and len(curve) < budget:
            picked.append(pick)
            loop.save(pick, refs[pick])
            curve.append(loop.evaluate(sessions, refs))
            bar.update(1)
            bar.set_postfix(strategy=strategy, labels=len(curve), dice=f"{curve[-1]:.3f}")
            if len(curve) < budget:
                pick = loop.client.next_sample(strategy, {"structure": name}).get("id")
        return curve, picked
    finally:
        loop.close()


def simulate_al(
    studies: str | Path,
    structure: str,
    strategies: list[str],
    budget: int = 8,
    repeats: int = 3,
    eval_studies: int = 5,
    pool_size: int = 0,
    seed: int = 0,
    out: str | Path = "active_learning.json",
    seconds_per_study: float = 0.0,
) -> dict:
    studies, out = Path(studies), Path(out)
    if budget < 2:
        raise ValueError("--budget must be at least 2 (one shared starting label, then the strategy's picks)")
    name, value = resolve_structure(studies, structure)
    work = Path(tempfile.mkdtemp(prefix="metaapp-al-"))
    images = image_ids(studies)
    refs = reference_masks(studies, value, work / "refs")
    setup = Setup(images, refs, name, value, budget, seconds_per_study)
    if len(refs) < eval_studies + budget:
        raise ValueError(f"{len(refs)} studies hold {name!r}: need --eval-studies + --budget = {eval_studies + budget}")
    curves: dict[str, list[list[float]]] = {}
    t_start = time.time()
    if "all" in strategies:  # every strategy the app registers, stock ones included
        loop = Loop(work / "probe", images, sorted(refs)[:1], name, value)
        try:
            strategies = sorted(requests.get(f"{loop.server.url}/info/", timeout=30).json()["strategies"])
        finally:
            loop.close()
    bar = tqdm(total=repeats * len(strategies) * budget, unit="label", desc="simulate-al")
    try:
        for r in range(repeats):
            rng = random.Random(seed + r)
            labelled = sorted(refs)
            rng.shuffle(labelled)
            held, pool = labelled[:eval_studies], labelled[eval_studies:]
            pool = sorted(pool[:pool_size] if pool_size else pool)
            start = rng.choice(pool)
            for strategy in strategies:
                bar.set_postfix(repeat=r, strategy=strategy)
                curve, picked = run_one(work / f"r{r}_{strategy}", setup, pool, held, start, strategy, bar)
                curves.setdefault(strategy, []).append(curve)
                with (work / "picks.jsonl").open("a") as f:
                    rec = {"repeat": r, "strategy": strategy, "held_out": held, "picks": picked, "dice": curve}
                    f.write(json.dumps(rec) + "\n")
    finally:
        bar.close()
    result = summarise(curves, budget)
    picks = [json.loads(x) for x in (work / "picks.jsonl").read_text().splitlines()]
    result["settings"] = {
        "studies": str(studies),
        "structure": name,
        "value": value,
        "strategies": strategies,
        "budget": budget,
        "repeats": repeats,
        "eval_studies": eval_studies,
        "pool_size": pool_size or "all",
        "held_out": sorted({h for x in picks for h in x["held_out"]}),
        "seed": seed,
        "seconds_per_study": seconds_per_study,
        "start": "one random pool study per repeat, the same for every strategy",
        "minutes": round((time.time() - t_start) / 60, 1),
    }
    result["picks"] = picks
    result["provenance"] = stamp([SHIPPED_SEG])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    shutil.rmtree(work, ignore_errors=True)
    return result


def summarise(curves: dict[str, list[list[float]]], budget: int) -> dict:
    rows, summary = [], {}
    for strategy, runs in curves.items():
        n = min(len(c) for c in runs)
        mean = [statistics.fmean(c[i] for c in runs) for i in range(n)]
        for i in range(n):
            vals = [c[i] for c in runs]
            std = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            rows.append({"strategy": strategy, "labels": i + 1, "dice_mean": mean[i], "dice_std": std, "n": len(vals)})
        summary[strategy] = {"auc": float(np.mean(mean)), "final_dice": mean[-1], "curve": mean}
    if "random" in summary:
        target = summary["random"]["final_dice"]
        for s in summary.values():
            reach = next((i + 1 for i, d in enumerate(s["curve"]) if d >= target), None)
            s["labels_to_reach_random_final"] = reach
            s["label_saving_vs_random"] = None if reach is None else round(1 - reach / budget, 3)
    return {"rows": rows, "summary": summary}


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for strategy in sorted({r["strategy"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["strategy"] == strategy]
        x = [r["labels"] for r in rows]
        m = np.array([r["dice_mean"] for r in rows])
        s = np.array([r["dice_std"] for r in rows])
        auc = result["summary"][strategy]["auc"]
        ax.plot(x, m, marker="o", label=f"{strategy} (AUC {auc:.3f})")
        ax.fill_between(x, m - s, m + s, alpha=0.12)
    st = result["settings"]
    ax.set_xlabel("labelled studies")
    ax.set_ylabel(f"Dice on {st['eval_studies']} held-out studies")
    ax.set_title(f"Active learning: {st['structure']} ({st['repeats']} repeats)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
