"""Meta-training throughput, old and new episode pipelines side by side: episodes per second and where a
step's time goes (sampling, forward, backward, optimiser, all-reduce).

Arms, each from the same initial weights on the same studies (the shipped model's sources: cardiac MRI
and TotalSegmentator's examples), alternated in rounds so that drift in the machine's load falls on
all of them alike:
* `classic`: `EpisodeSampler`, one episode at a time, one encoder pass per episode;
* `bank`: `BankSampler`, a step's episodes cut and augmented together on the training device, one
  encoder pass per episode;
* `bank+batched`: the same episodes, one encoder pass for the whole step (the default on CUDA).
The share of sampling is the figure that predicts how a faster device is used: forward and backward
shrink on it, sampling's seconds stay.

Usage (under 5 minutes on a 2-core CPU; on a GPU machine pass --device cuda):
    python benchmarks/metatrain_throughput.py --device cpu [--steps 4 --rounds 2 --tasks-per-step 8]
    python benchmarks/metatrain_throughput.py --device cuda --studies cmr_all.npz totalseg.npz
With --studies, the same sources come from study banks (`metaapp bank`), for a machine that has
the banks but not ../shared/datasets (benchmarks/gpu_check.sh).
Results: benchmarks/results/metatrain_throughput[_<device>].json + .png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from monailabel_metaapp.core.checkpoint import pick_device  # noqa: E402
from monailabel_metaapp.core.episodes import read_studies, split_validation  # noqa: E402
from monailabel_metaapp.core.metatrain import MetaTrainConfig, episode_sources, make_optimizer, outer_step  # noqa: E402
from monailabel_metaapp.core.networks import FewShotSegModel  # noqa: E402
from monailabel_metaapp.core.objective import meta_objective  # noqa: E402
from monailabel_metaapp.core.profile import PHASES, StepTimer  # noqa: E402
from monailabel_metaapp.evaluate_common import write_result  # noqa: E402
from monailabel_metaapp.shared_data import cmr_view, require_shared_datasets, totalseg_view  # noqa: E402

ARMS = {"classic": ("classic", False), "bank": ("bank", False), "bank+batched": ("bank", True)}


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(result["arms"])
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.7 * len(arms)))
    left = [0.0] * len(arms)
    for phase in PHASES:
        secs = [result["arms"][a]["seconds_per_step"] * result["arms"][a]["share"][phase] for a in arms]
        ax.barh(arms, secs, left=left, label=phase)
        left = [x + s for x, s in zip(left, secs)]
    for i, a in enumerate(arms):
        ax.text(left[i], i, f"  {result['arms'][a]['episodes_per_second']:.2f} episodes/s", va="center", fontsize=8)
    ax.set_xlabel("seconds per outer step")
    ax.set_xlim(0, max(left) * 1.35)
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncol=len(PHASES), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_title(f"meta-training step, {result['settings']['device']}", fontsize=9, pad=22)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu|cuda|auto")
    ap.add_argument("--work", type=Path, default=Path("/tmp/metatrain_throughput"), help="dataset views")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per arm and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tasks-per-step", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: torch's default)")
    ap.add_argument("--studies", type=Path, nargs="*", help="study banks instead of ../shared/datasets")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = pick_device(a.device)
    if not a.studies:
        require_shared_datasets()
        a.work.mkdir(parents=True, exist_ok=True)
    studies = read_studies(a.studies or [cmr_view(a.work / "cmr"), totalseg_view(a.work / "totalseg")], 160)
    train, val = split_validation(studies, 0)
    timers, states = {}, {}
    for name, (sampler, batched) in ARMS.items():
        torch.manual_seed(0)
        model = FewShotSegModel().to(dev).train()
        cfg = MetaTrainConfig(tasks_per_step=a.tasks_per_step, sampler=sampler, batch_episodes=batched)
        draw, _ = episode_sources(train, val, studies, model.cfg.context, cfg, dev)
        opt, params = make_optimizer(model, cfg)

        def objective(eps, model=model, cfg=cfg):
            return meta_objective(model, eps, cfg.lambda_kl, cfg.inner_steps, batched=cfg.batch_episodes)

        outer_step(model, opt, params, draw, objective, a.tasks_per_step)  # warm-up, untimed
        states[name] = (model, opt, params, draw, objective)
        timers[name] = StepTimer(dev)
    for r in range(a.rounds):
        for name, (model, opt, params, draw, objective) in states.items():
            for _ in range(a.steps):
                outer_step(model, opt, params, draw, objective, a.tasks_per_step, timer=timers[name])
            print(f"round {r + 1} {name}: {timers[name].line()}", flush=True)
    arms = {name: t.to_dict() | {"line": t.line()} for name, t in timers.items()}
    base = arms["classic"]["episodes_per_second"]
    result = {
        "question": "episodes per second and the split of a meta-training step, old and new episode pipelines",
        "settings": {
            "device": str(dev),
            "host_threads": torch.get_num_threads(),
            "steps": a.steps,
            "rounds": a.rounds,
            "tasks_per_step": a.tasks_per_step,
            "studies": len(studies),
            "sources": "MS-CMRSeg bSSFP (35) + TotalSegmentator examples",
        },  # fmt: skip
        "arms": arms,
        "speedup_vs_classic": {n: round(v["episodes_per_second"] / base, 3) for n, v in arms.items()},
    }
    out = a.out or REPO / "benchmarks" / "results" / f"metatrain_throughput_{dev.type}.json"
    write_result(result, out, plot, weights=[])
    print(json.dumps(result["speedup_vs_classic"]), "->", out)


if __name__ == "__main__":
    main()
