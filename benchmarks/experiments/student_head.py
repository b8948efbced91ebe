"""With one labelled study of a structure the encoder never saw, does a light task-specific network
over the cached meta-learned embeddings beat end-to-end refinement and a UNet from scratch, second for
second?

Refinement fine-tunes the whole encoder: a step costs 0.6-0.9 s on one core, and on a held-out
structure it plateaus near the quick head (the RV blood pool fold: 0.39 served at 150 s against
scratch's 0.68). The `student` here keeps the encoder frozen: the study's embeddings are computed
once (the app caches them from the first inference), and a small convolutional network over
[embeddings, the 2.5D image, the quick head's logits] learns a residual on the quick head's logits
(zero-initialised last layer: it starts as the quick head). Each step costs only the small network,
and the image channels let it see what the encoder's features leave out.

Methods, each with its own clock (process CPU seconds on one thread), scored at each mark by the mean
whole-volume Dice over the query studies on their original grids:
* `student`: the network above, Adam 1e-3, 8 slices a step (3 in 4 holding the structure), random
  flips and right-angle rotations, bfloat16 where native;
* `finetune`: `core.refine.Refinement(guard=False)`, the app's refinement run at one label (the quick
  head as teacher on 3 anchor studies);
* `scratch`: `evaluate.ScratchTrainer`, the timeline's scratch baseline.
Draws as in `metaapp evaluate seg --timeline` at one label (`--draws 0` is the timeline's repeat 0).

    OMP_NUM_THREADS=1 python benchmarks/experiments/student_head.py --studies DIR --structure 600
        --model FOLD.pt [--draws 0,1,2] [--queries 4] [--marks 10,30,60,150] --out F.json
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from one_label_signals import one_label_draw  # noqa: E402

from monailabel_metaapp.core.episodes import with_context  # noqa: E402
from monailabel_metaapp.core.inner_loop import seg_loss  # noqa: E402
from monailabel_metaapp.core.precision import training_autocast  # noqa: E402
from monailabel_metaapp.core.refine import RefineConfig, Refinement  # noqa: E402
from monailabel_metaapp.evaluate import ScratchTrainer, _probs_to_mask, dice, mean_query_dice  # noqa: E402
from monailabel_metaapp.evaluate_common import int_list, write_result  # noqa: E402
from monailabel_metaapp.provenance import SHIPPED_SEG  # noqa: E402


class Student(nn.Module):
    """A residual on the quick head's logits from [embeddings, image, head logits]: four 3x3
    convolutions with growing dilation (receptive field 31 pixels), the last layer zero-initialised."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        layers, c = [], channels
        for d in (1, 2, 4, 8):
            layers += [nn.Conv2d(c, width, 3, padding=d, dilation=d), nn.GroupNorm(4, width), nn.ReLU()]
            c = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1] + self.out(self.body(x))[:, 0]


@torch.no_grad()
def student_inputs(ad, head, stack: torch.Tensor) -> torch.Tensor:
    """(S, C + 2 * context + 1 + 1, H, W): embeddings, the 2.5D image, the quick head's logits."""
    feats = ad.embed(stack).float()
    p = ad.predict(stack, [head], feats=feats)[0].clamp(1e-4, 1 - 1e-4)
    img = torch.cat([with_context(stack, [i], ad.model.cfg.context) for i in range(stack.shape[0])])
    return torch.cat([feats, img, (torch.log(p) - torch.log1p(-p))[:, None]], 1)


def student_dice(net: Student, inputs: list[torch.Tensor], query, value: int, one_piece: bool) -> float:
    net.eval()
    with torch.no_grad():
        preds = [_probs_to_mask(torch.sigmoid(net(x))[None], q.geom, one_piece) for x, q in zip(inputs, query)]
    net.train()
    return sum(dice(p, q.ref == value) for p, q in zip(preds, query)) / len(query)


def run_draw(studies: str, value: int, model: str, queries: int, draw: int, marks: list[float]) -> list[dict]:
    ad, support, query, anchors, mask, quick = one_label_draw(studies, value, model, queries, draw)
    rows = [
        {
            "draw": draw,
            "method": "quick head",
            "seconds": 0.0,
            "steps": 0,
            "dice": mean_query_dice(ad, quick, query, value),
        }
    ]
    print(f"draw {draw}: quick head {rows[0]['dice']:.3f}", flush=True)

    def clocked(name: str, step, score) -> None:
        clock, steps, pending = 0.0, 0, sorted(marks)
        while pending:
            t0 = time.process_time()
            step()
            clock += time.process_time() - t0
            steps += 1
            while pending and clock >= pending[0]:
                d = score()
                rows.append({"draw": draw, "method": name, "seconds": pending.pop(0), "steps": steps, "dice": d})
                print(f"draw {draw}: {name} {rows[-1]['seconds']:.0f} s {d:.3f} ({steps} steps)", flush=True)

    # student: inputs cached once (the app has the embeddings from the first inference)
    torch.manual_seed(draw)
    rng = random.Random(draw)
    x_s = student_inputs(ad, quick, support.stack)
    q_in = [student_inputs(ad, quick, q.stack) for q in query]
    net = Student(x_s.shape[1])
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    fg = [i for i in range(mask.shape[0]) if bool(mask[i].any())]

    def student_step() -> None:
        idx = [rng.choice(fg) if rng.random() < 0.75 else rng.randrange(mask.shape[0]) for _ in range(8)]
        x, y = x_s[idx], mask[idx].float()
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        k = rng.randrange(4)
        x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
        with training_autocast("cpu"):
            logits = net(x)
        loss = seg_loss(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    clocked("student", student_step, lambda: student_dice(net, q_in, query, value, quick.one_piece))

    run = Refinement(ad, [support.stack], [mask], quick, RefineConfig(), seed=draw, guard=False, anchors=anchors)

    def finetune_score() -> float:
        run.model.encoder.net.eval()
        d = mean_query_dice(run.adapter, run.head(), query, value)
        run.model.encoder.net.train()
        return d

    clocked("finetune", run.step, finetune_score)

    scratch = ScratchTrainer([support.stack], [mask], ad.device, draw)

    def scratch_score() -> float:
        preds = [_probs_to_mask(scratch.predict(q.stack), q.geom, quick.one_piece) for q in query]
        return sum(dice(p, q.ref == value) for p, q in zip(preds, query)) / len(query)

    clocked("scratch", scratch.step, scratch_score)
    return rows


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    head = [r["dice"] for r in rows if r["method"] == "quick head"]
    ax.axhline(sum(head) / len(head), color="grey", ls=":", label="quick head")
    for method in ("student", "finetune", "scratch"):
        marks = sorted({r["seconds"] for r in rows if r["method"] == method})
        mean = [
            sum(r["dice"] for r in rows if r["method"] == method and r["seconds"] == m)
            / len([r for r in rows if r["method"] == method and r["seconds"] == m])
            for m in marks
        ]
        ax.plot(marks, mean, "o-", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("seconds of compute on one core after the save")
    ax.set_ylabel("mean query Dice (whole volume)")
    s = result["settings"]
    ax.set_title(f"one label, structure {s['structure']} held out of meta-training, draws {s['draws']}", fontsize=9)
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
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--marks", default="10,30,60,150")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    marks = [float(m) for m in a.marks.split(",")]
    rows = [r for d in a.draws for r in run_draw(a.studies, a.structure, a.model, a.queries, d, marks)]
    settings = {
        "studies": a.studies,
        "structure": a.structure,
        "model": a.model,
        "draws": a.draws,
        "queries": a.queries,
    }
    write_result({"settings": settings, "rows": rows}, a.out, plot, weights=[a.model or SHIPPED_SEG])


if __name__ == "__main__":
    main()
