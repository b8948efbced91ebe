"""Seconds per refinement step with the encoder's embeddings handed to the head channels-last (as
`Refinement` does) against channels-first, as the encoder returns them, side by side in one process on
one torch thread.

`PrototypeHead.logits` takes the cosine similarity of every pixel to every prototype in one matmul
over (N, H, W, C); channels-last embeddings make that a view, channels-first ones a copy on every step
and its backward. Arms, alternated in rounds so that drift in the machine's load falls on both alike,
each a fresh guarded run on the sample studies' grey matter (a step's cost depends on the slice size
and the batch, not on the data): two labelled studies (4 slices per step, no teacher) and one
labelled study (4 + 4 slices with the quick head as teacher).

Usage (about 2 minutes on a 2-core CPU):
    OMP_NUM_THREADS=1 python benchmarks/experiments/refine_step_layout.py [--steps 8 --rounds 3]
Results: benchmarks/results/refine_step_layout.json + .png
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from refine_step_precision import median_step_seconds, plot_pairs, setup  # noqa: E402

from monailabel_metaapp.core.adaptation import SegAdapter  # noqa: E402
from monailabel_metaapp.core.precision import training_autocast  # noqa: E402
from monailabel_metaapp.core.refine import RefineConfig, Refinement  # noqa: E402
from monailabel_metaapp.evaluate_common import write_result  # noqa: E402
from monailabel_metaapp.provenance import SHIPPED_SEG  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "refine_step_layout.json"
GREY_MATTER = 1


class ChannelsFirst(Refinement):
    """`Refinement` with the embeddings in the layout the encoder returns them (channels-first)."""

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        with training_autocast(self.device, self.cfg.bf16):
            feats = self.model.embed(x)
        return feats.float()


def arms(adapter: SegAdapter, studies) -> dict:
    """name -> (channels-first stepper, channels-last stepper), each a fresh run on the same data."""
    stacks = [s.stack for s in studies]
    masks = [s.lstack == GREY_MATTER for s in studies]
    heads = {k: adapter.adapt(stacks[:k], masks[:k]) for k in (1, 2)}

    def refine(k: int, cls: type[Refinement]):
        return cls(adapter, stacks[:k], masks[:k], heads[k], RefineConfig(), anchors=stacks[2:5]).step

    return {f"refine k={k}": (refine(k, ChannelsFirst), refine(k, Refinement)) for k in (2, 1)}


def plot(result: dict, png: Path) -> None:
    keys, labels = ("channels_first_s", "channels_last_s"), ("channels-first", "channels-last (refinement)")
    plot_pairs(result, png, keys, labels, "a refinement step")


def main() -> None:
    a, adapter, studies = setup(__doc__.split("\n\n")[0], OUT)
    rows = []
    for name, (first, last) in median_step_seconds(arms(adapter, studies), a.rounds, a.steps).items():
        speedup = round(first / last, 2)
        rows.append(
            {"arm": name, "channels_first_s": round(first, 4), "channels_last_s": round(last, 4), "speedup": speedup}
        )
        print(f"{name:12s} channels-first {first:.3f} s  channels-last {last:.3f} s  {first / last:.2f}x")
    result = {"settings": {"steps": a.steps, "rounds": a.rounds, "studies": a.studies, "threads": 1}, "rows": rows}
    write_result(result, a.out, plot, weights=[SHIPPED_SEG])
    print(a.out)


if __name__ == "__main__":
    main()
