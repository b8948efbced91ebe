"""`metaapp evaluate seg`: few-shot segmentation on a datastore folder, the product against baselines
in the same run, whole-volume 3D Dice on the original voxel grid.

Methods: `meta` (the product: prototype init + Meta-SGD head adaptation), `proto` (prototype init,
no gradient step), `finetune` (the whole meta-trained network fine-tuned with Adam for as long as
`meta` adapted), `scratch` (a MONAI UNet from random init trained on the same support for
`--scratch-seconds`).

`--protocol oracle` is SSL-ALPNet's 1-shot protocol: query slices limited to the structure's extent,
split in 3 chunks, each predicted from the middle support slice of its chunk."""

from __future__ import annotations

import copy
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.networks.nets import UNet
from tqdm import tqdm

from monailabel_metaapp.core.adaptation import (
    COMPONENT_KEY,
    DEFAULT_ADAPT_STEPS,
    ONE_PIECE,
    Head,
    SegAdapter,
    dice,
    largest_component_share,
    probabilities_to_labels,
)
from monailabel_metaapp.core.checkpoint import load_model, pick_device
from monailabel_metaapp.core.episodes import augment, image_files, label_names, with_context
from monailabel_metaapp.core.inner_loop import seg_loss
from monailabel_metaapp.core.precision import training_autocast
from monailabel_metaapp.core.volume import SliceGeometry, label_slices, read_image, stack_to_original, to_slices
from monailabel_metaapp.evaluate_common import int_list, plot_curves, write_result
from monailabel_metaapp.provenance import SHIPPED_SEG
from monailabel_metaapp.samples import REFERENCES_DIR


@dataclass
class EvalStudy:
    name: str
    stack: torch.Tensor  # (S, size, size) in [0, 1]
    lstack: torch.Tensor  # (S, size, size) label values on the slice grid
    geom: SliceGeometry
    ref: np.ndarray  # label values on the original grid (z, y, x)


def load_eval_studies(folder: str | Path, size: int) -> list[EvalStudy]:
    """Every study of a datastore folder with a reference: its final label, or for the sample
    studies the held-out reference in `.references/` (`metaapp samples`)."""
    out = []
    for f in tqdm(image_files(folder), desc="reading", unit="study"):
        lp = Path(folder) / "labels" / "final" / f.name
        if not lp.exists():
            lp = Path(folder) / REFERENCES_DIR / f.name
        if not lp.exists():
            continue
        stack, geom = to_slices(read_image(f), size)
        lbl = read_image(lp)
        out.append(
            EvalStudy(f.name, stack, label_slices(lbl, geom, size), geom, sitk.GetArrayFromImage(lbl).astype(np.int32))
        )
    if not out:
        raise FileNotFoundError(f"{folder}: no image has a final label")
    return out


def structure_labels(studies: str | Path, data: list[EvalStudy]) -> dict[str, int]:
    """name -> value of every structure the studies' references hold, named by `labels.json` (the value
    itself when unnamed).

    Args:
        studies: the datastore folder.
        data: its studies (`load_eval_studies`).
    """
    names = label_names(studies)
    values = sorted({int(v) for s in data for v in np.unique(s.ref) if v > 0})
    return {names.get(v, str(v)): v for v in values}


def setup(
    studies: str | Path, labels: dict[str, int] | None, model: str | None, device: str, steps: int = DEFAULT_ADAPT_STEPS
) -> tuple[torch.device, SegAdapter, list[EvalStudy], dict[str, int]]:
    """What every segmentation evaluation starts from: the device, an adapter of `model` (default: the
    shipped weights), the studies with their references, and the structures (default: all found)."""
    dev = pick_device(device)
    adapter = SegAdapter(load_model(model, dev), dev, steps=steps)
    data = load_eval_studies(studies, adapter.size)
    return dev, adapter, data, labels or structure_labels(studies, data)


def draw_order(pool: list, seed: int, value: int, k: int, repeat: int) -> list:
    """The seeded order of a structure's studies for draw `repeat` at k shots: the first k are the
    support, the next ones the queries. Every segmentation evaluation draws its pairs this way, so that
    two scripts score the same (support, query) pairs."""
    return random.Random(f"{seed}-{value}-{k}-{repeat}").sample(pool, len(pool))


def _probs_to_mask(probs: torch.Tensor, geom: SliceGeometry, one_piece: bool) -> np.ndarray:
    return probabilities_to_labels(stack_to_original(probs, geom), [1], one_piece=one_piece) == 1


def mean_query_dice(ad: SegAdapter, head: Head, query: list[EvalStudy], value: int) -> float:
    """Mean whole-volume Dice of (ad, head) over the query studies, on their original grids."""
    preds = [_probs_to_mask(ad.predict(q.stack, [head]), q.geom, head.one_piece) for q in query]
    return statistics.fmean(dice(p, q.ref == value) for p, q in zip(preds, query))


class ScratchTrainer:
    """A 2D MONAI UNet from random init, trained step by step on every slice of the support studies.

    Args:
        stacks: (S, size, size) support images.
        masks: (S, size, size) binary masks of the structure.
        device: where to train.
        seed: seed of the init, the batches and the augmentation.
        bf16: forward passes under bfloat16 autocast where native (`core.precision`), as refinement
            trains, so that both get the same arithmetic for their seconds.
    """

    def __init__(
        self, stacks: list[torch.Tensor], masks: list[torch.Tensor], device: torch.device, seed: int, bf16: bool = True
    ):
        torch.manual_seed(seed)
        self.bf16 = bf16
        self.rng = random.Random(seed)
        self.device = device
        self.net = UNet(2, 1, 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1).to(device)
        xs = [st[i : i + 1] for st in stacks for i in range(st.shape[0])]
        ys = [m[i].float() for m in masks for i in range(m.shape[0])]
        self.x_all, self.y_all = torch.stack(xs).to(device), torch.stack(ys).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), 1e-3)

    def step(self) -> None:
        self.net.train()
        idx = torch.tensor([self.rng.randrange(self.x_all.shape[0]) for _ in range(8)])
        x, y = augment(self.x_all[idx], self.y_all[idx], self.rng, 0.5)
        with training_autocast(self.device, self.bf16):
            logits = self.net(x)[:, 0]
        loss = seg_loss(logits.float(), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def predict(self, stack: torch.Tensor) -> torch.Tensor:
        """(S, size, size) -> (1, S, size, size) foreground probabilities."""
        self.net.eval()
        x = stack[:, None].to(self.device)
        probs = torch.cat([torch.sigmoid(self.net(x[i : i + 16])) for i in range(0, x.shape[0], 16)])
        return probs[:, 0][None].cpu()


def train_scratch(
    stacks: list[torch.Tensor], masks: list[torch.Tensor], seconds: float, device: torch.device, seed: int
) -> ScratchTrainer:
    """`ScratchTrainer` trained for `seconds` of wall time."""
    trainer = ScratchTrainer(stacks, masks, device, seed)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        trainer.step()
    return trainer


def finetune(adapter: SegAdapter, stacks, masks, seconds: float, seed: int) -> tuple[SegAdapter, Head]:
    """Plain end-to-end fine-tuning of the meta-trained network (encoder + head) with Adam."""
    torch.manual_seed(seed)
    model = copy.deepcopy(adapter.model).train()
    ad = SegAdapter(model, adapter.device, steps=0)
    head = ad.adapt(stacks, masks, steps=0)
    share = head.params.pop(COMPONENT_KEY)
    params = {k: v.clone().requires_grad_(True) for k, v in head.params.items()}
    opt = torch.optim.Adam(list(model.encoder.parameters()) + list(params.values()), 1e-4)
    idx_all = [(j, i) for j, m in enumerate(masks) for i in ad.support_slices(m)]
    rng = random.Random(seed)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pick = [idx_all[rng.randrange(len(idx_all))] for _ in range(4)]
        x = torch.cat([with_context(stacks[j], [i], model.cfg.context) for j, i in pick]).to(ad.device)
        y = torch.stack([masks[j][i].float() for j, i in pick]).to(ad.device)
        with training_autocast(ad.device):
            feats = model.embed(x)
        loss = seg_loss(model.head.logits(feats.float(), params), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return ad, Head({**{k: v.detach() for k, v in params.items()}, COMPONENT_KEY: share}, len(stacks), seconds)


def _oracle(
    adapter: SegAdapter, support: list[EvalStudy], query: EvalStudy, v: int, one_piece: bool
) -> tuple[float, float]:
    """SSL-ALPNet protocol: 3 chunks of the query's extent, each from its support chunk's middle slice."""

    def chunks(mask: torch.Tensor) -> list[list[int]]:
        idx = [int(i) for i in torch.nonzero(mask.flatten(1).any(1)).flatten()]
        return [list(c) for c in np.array_split(idx, 3) if len(c)]

    qm = query.lstack == v
    qc = chunks(qm)
    probs = torch.zeros((1, *query.stack.shape))
    seconds = 0.0
    for c, q_idx in enumerate(qc):
        f_s, m_s = [], []
        for s in support:
            sc = chunks(s.lstack == v)
            mid = sc[min(c, len(sc) - 1)][len(sc[min(c, len(sc) - 1)]) // 2]
            f_s.append(adapter.embed(s.stack, [mid]))
            m_s.append((s.lstack[mid] == v).float()[None].to(adapter.device))
        t = time.perf_counter()
        head = adapter.adapt_features(torch.cat(f_s), torch.cat(m_s))
        seconds += time.perf_counter() - t
        probs[:, q_idx] = adapter.predict(query.stack[q_idx], [head])
    pred = _probs_to_mask(probs, query.geom, one_piece)
    ref = query.ref == v
    # restrict to the structure's extent along the slice axis
    keep = np.zeros(query.geom.n_slices, bool)
    keep[[i for c in qc for i in c]] = True
    sel = _extent_mask(query, keep)
    return dice(pred & sel, ref & sel), seconds


def _extent_mask(query: EvalStudy, keep: np.ndarray) -> np.ndarray:
    """Voxels of the original grid that lie on the kept slices (mapped back through the geometry)."""
    probs = torch.from_numpy(np.broadcast_to(keep[:, None, None], query.stack.shape).astype(np.float32))[None]
    return stack_to_original(probs, query.geom)[0] > 0.5


def evaluate_seg(
    studies: str | Path,
    shots: list[int],
    labels: dict[str, int] | None = None,
    model: str | None = None,
    repeats: int = 3,
    queries: int = 8,
    baselines: list[str] | None = None,
    scratch_seconds: float = 150.0,
    protocol: str = "volume",
    seed: int = 0,
    device: str = "auto",
    steps: int = DEFAULT_ADAPT_STEPS,
) -> dict:
    dev, adapter, data, labels = setup(studies, labels, model, device, steps)
    baselines = [b for b in (baselines or []) if b]
    methods = ["meta", *baselines] if protocol == "volume" else ["meta", *[b for b in baselines if b == "proto"]]
    results: dict[tuple, list[tuple[float, float]]] = {}
    total = len(labels) * len(shots) * repeats
    bar = tqdm(total=total, desc=f"evaluate ({protocol})", unit="episode")
    for name, v in labels.items():
        pool = [s for s in data if (s.ref == v).any()]
        for k in shots:
            if len(pool) < k + 1:
                bar.update(repeats)
                continue
            for r in range(repeats):
                order = draw_order(pool, seed, v, k, r)
                support, query = order[:k], order[k : k + queries]
                stacks = [s.stack for s in support]
                masks = [s.lstack == v for s in support]
                if protocol == "oracle":
                    one_piece = largest_component_share(masks) >= ONE_PIECE  # as a head of this support
                    for method in methods:
                        ad = adapter if method == "meta" else SegAdapter(adapter.model, dev, steps=0)
                        for q in query:
                            d, sec = _oracle(ad, support, q, v, one_piece)
                            results.setdefault((name, k, method), []).append((d, sec))
                    bar.update(1)
                    continue
                head = adapter.adapt(stacks, masks)
                meta_seconds = head.seconds
                runs: dict[str, tuple] = {"meta": (adapter, head, meta_seconds)}
                if "proto" in methods:
                    h = adapter.adapt(stacks, masks, steps=0)
                    runs["proto"] = (adapter, h, h.seconds)
                if "finetune" in methods:
                    ad_ft, h = finetune(adapter, stacks, masks, meta_seconds, seed + r)
                    runs["finetune"] = (ad_ft, h, meta_seconds)
                scratch_net = None
                if "scratch" in methods:
                    scratch_net = train_scratch(stacks, masks, scratch_seconds, dev, seed + r)
                for q in query:
                    ref = q.ref == v
                    for method, (ad, h, sec) in runs.items():
                        pred = _probs_to_mask(ad.predict(q.stack, [h]), q.geom, h.one_piece)
                        results.setdefault((name, k, method), []).append((dice(pred, ref), sec))
                    if scratch_net is not None:
                        pred = _probs_to_mask(scratch_net.predict(q.stack), q.geom, head.one_piece)
                        results.setdefault((name, k, "scratch"), []).append((dice(pred, ref), scratch_seconds))
                bar.update(1)
    bar.close()
    rows = [
        dice_row(name, k, method, [d for d, _ in vals], adapt_seconds=round(statistics.fmean(s for _, s in vals), 3))
        for (name, k, method), vals in results.items()
    ]
    settings = {
        "studies": str(studies),
        "shots": shots,
        "labels": labels,
        "model": model or "shipped",
        "repeats": repeats,
        "queries": queries,
        "baselines": baselines,
        "scratch_seconds": scratch_seconds,
        "protocol": protocol,
        "seed": seed,
        "device": str(dev),
        "adapt_steps": steps,
        "torch_threads": torch.get_num_threads(),
    }
    return {"settings": settings, "rows": rows}


def dice_row(structure: str, shots: int, method: str, dices: list[float], **extra) -> dict:
    """One result row: a method's mean and spread of Dice for a structure and k (and `extra` fields), and
    each episode's Dice (episodes are drawn alike for every model, so two models compare pairwise)."""
    return {
        "structure": structure,
        "shots": shots,
        "method": method,
        **extra,
        "dice_mean": round(statistics.fmean(dices), 4),
        "dice_std": round(statistics.pstdev(dices), 4),
        "n": len(dices),
        "values": [round(d, 4) for d in dices],
    }


def plot_rows(rows: list[dict], out_png: str | Path, title: str = "") -> None:
    """Dice against shots, one panel per structure, one curve per method."""
    plot_curves(
        rows, out_png, "dice_mean", "dice_std", "Dice", "labelled studies (shots)", "structure", title, ylim=(0, 1)
    )


def run_from_args(a) -> None:
    if not a.studies:
        raise ValueError("evaluate seg needs --studies DIR (a datastore folder with final labels)")
    shots, weights = int_list(a.shots), [a.model or SHIPPED_SEG]
    common = {
        "labels": json.loads(a.labels) if a.labels else None,
        "model": a.model,
        "repeats": a.repeats,
        "queries": a.queries,
        "seed": a.seed,
        "device": a.device,
    }
    if a.timeline:
        from monailabel_metaapp.core.refine import RefineConfig
        from monailabel_metaapp.evaluate_timeline import evaluate_timeline, plot_timeline

        marks = [float(m) for m in str(a.timeline).split(",")]
        res = evaluate_timeline(a.studies, shots, marks, cfg=RefineConfig.parse(a.refine), **common)
        write_result(res, a.out, lambda r, png: plot_timeline(r["rows"], png, "served Dice after a save"))
        for r in res["rows"]:
            print(f"{r['structure']:>20} k={r['shots']} {r['seconds']:>6.0f}s {r['method']:>9}: {r['dice_mean']:.3f}")
        return
    if a.joint:
        from monailabel_metaapp.evaluate_joint import evaluate_seg_joint

        res, title = evaluate_seg_joint(a.studies, shots, **common), "structures predicted alone and together"
    else:
        baselines = [b for b in (a.baselines if a.baselines is not None else "scratch,finetune,proto").split(",") if b]
        res = evaluate_seg(
            a.studies, shots, baselines=baselines, scratch_seconds=a.scratch_seconds, protocol=a.protocol, **common
        )
        title = f"few-shot segmentation ({a.protocol})"
    write_result(res, a.out, lambda r, png: plot_rows(r["rows"], png, title), weights=weights)
    for r in sorted(res["rows"], key=lambda r: (r["structure"], r["shots"], r["method"])):
        dice_txt = f"{r['dice_mean']:.3f} ± {r['dice_std']:.3f}"
        print(f"{r['structure']:>20} k={r['shots']} {r['method']:>9}: Dice {dice_txt} (n={r['n']})")
