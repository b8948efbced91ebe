"""Does task variety make an encoder generalise to a modality it never saw? Encoders are meta-trained
side by side on the same sources with no cardiac image (TotalSegmentator's CT examples and the brain
sample studies), the same steps and seed, and differ only in their episodes:
* `classic`: labelled structures and one-scale superpixels, one episode at a time (`--sampler classic`);
* `bank`: the same plus label merges, superpixels at three scales, elastic warps and modality shifts
  (gamma, contrast inversion, bias field, noise), cut and augmented on the training device
  (`--sampler bank`);
* `bank_no_shifts`: `bank` without the modality shifts (`--task-shares intensity_prob=0`);
* `shifts_only`: the classic mix of tasks (half labelled, half one-scale superpixels, no merges) with the
  bank sampler's modality shifts and elastic warps.
Each is then scored by 1-shot whole-volume Dice on the cardiac MRI structures (LV myocardium, LV blood
pool, RV blood pool): same supports and queries for every arm.

The meta-trainings run at once, one torch thread each, so they share the machine alike (--arms picks
them; an arm whose log is final is reused, so arms can be added to an earlier run). Stages are
skipped when their output exists in --work (resumable).

Usage:
    python benchmarks/task_variety.py --work /tmp/variety --steps 350 --minutes 45 [--repeats 8 --queries 5]
Results: benchmarks/results/task_variety.json + .png (commands, logs' validation losses, provenance).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from site_adaptation import evaluate, metaapp, prepare  # noqa: E402

from monailabel_metaapp.evaluate_common import write_result  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "task_variety"
# arm -> its meta-train options; the arms differ only in their episodes
ARMS = {
    "classic": ["--sampler", "classic"],
    "bank": ["--sampler", "bank"],
    "bank_no_shifts": ["--sampler", "bank", "--task-shares", "intensity_prob=0"],
    "shifts_only": [
        "--sampler",
        "bank",
        "--task-shares",
        "labelled=0.5",
        "merge=0",
        "superpixel=0.5",
        "superpixel_scales=100",
    ],  # fmt: skip
}


def run_name(arm: str, seed: int) -> str:
    return arm if seed == 0 else f"{arm}_seed{seed}"


def train_arms(
    runs: list[tuple[str, int]], p: dict[str, Path], work: Path, steps: int, minutes: float, commands: list[str]
) -> dict[str, Path]:
    """Meta-train the (arm, seed) runs at once (one thread each); a run whose log is final is not rerun."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs, out = [], {}
    for arm, seed in runs:
        name = run_name(arm, seed)
        out[name] = work / f"{name}.pt"
        cmd = metaapp("meta-train", "--studies", str(p["totalseg"]), str(p["brain"]), "--out", str(out[name]),
                      "--minutes", str(minutes), "--max-steps", str(steps), "--tasks-per-step", "8",
                      "--device", "cpu", "--seed", str(seed), *ARMS[arm])  # fmt: skip
        commands.append("OMP_NUM_THREADS=1 " + shlex.join(["metaapp", *cmd[3:]]))
        log = Path(str(out[name]) + ".log.jsonl")
        if log.exists() and '"final": true' in log.read_text():
            continue
        print("$", commands[-1], flush=True)
        procs.append(subprocess.Popen(cmd, env=env, stdout=open(work / f"{name}.out", "a"), stderr=subprocess.STDOUT))
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"meta-training failed: see {work}/*.out")
    return out


def read_log(model: Path) -> dict:
    """The run's steps, minutes and last validation losses (by kind) from its JSON-lines log."""
    recs = [json.loads(line) for line in Path(str(model) + ".log.jsonl").read_text().splitlines() if line.strip()]
    final = recs[-1]
    return {"steps": final["step"], "minutes": round(final["seconds"] / 60, 1)} | {
        k: v for k, v in final.items() if k.startswith("val_loss")
    }


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(result["dice"])
    structures = list(result["dice"][arms[0]])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        vals = [result["dice"][arm][s]["dice"] for s in structures]
        errs = [result["dice"][arm][s]["std"] for s in structures]
        xs = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(structures))]
        ax.bar(xs, vals, width, yerr=errs, capsize=3, label=f"{arm} (mean {result['mean'][arm]:.2f})")
    ax.set_xticks(range(len(structures)), structures)
    ax.set_ylabel("1-shot whole-volume Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("cardiac MRI, encoders meta-trained without cardiac images", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/variety"), help="data, weights and logs")
    ap.add_argument("--steps", type=int, default=300, help="outer steps of each meta-training")
    ap.add_argument("--minutes", type=float, default=60.0, help="time cap of each meta-training")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="the evaluation's draws of supports and queries")
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[0], help="one meta-training per arm and seed")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                    help="arms meta-trained at once, one thread each (an arm with a final log is reused)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    p = prepare(a.work, commands)
    runs = [(arm, seed) for arm in a.arms for seed in a.train_seeds]
    models = train_arms(runs, p, a.work, a.steps, a.minutes, commands)
    dice = {name: evaluate(model, p["cmr"], a.repeats, a.queries, a.seed) for name, model in models.items()}
    mean = {name: round(sum(v["dice"] for v in d.values()) / len(d), 4) for name, d in dice.items()}
    by_arm = {arm: [mean[run_name(arm, s)] for s in a.train_seeds] for arm in a.arms}
    over_seeds = {arm: round(sum(v) / len(v), 4) for arm, v in by_arm.items()}
    result = {
        "question": "1-shot cardiac Dice of encoders meta-trained without cardiac images: classic episodes "
        "against the bank sampler's more varied ones (label merges, multi-scale superpixels, modality shifts)",
        "settings": {
            "steps": a.steps,
            "minutes_cap": a.minutes,
            "repeats": a.repeats,
            "queries": a.queries,
            "seed": a.seed,
            "train_seeds": a.train_seeds,
            "protocol": "volume",
            "torch_threads": 1,
        },  # fmt: skip
        "commands": commands,
        "training": {name: read_log(model) for name, model in models.items()},
        "dice": dice,
        "mean": mean,
        "mean_over_seeds": over_seeds,
        "minus_classic": {arm: round(v - over_seeds["classic"], 4) for arm, v in over_seeds.items()}
        if "classic" in over_seeds
        else {},
    }
    write_result(result, a.out.with_suffix(".json"), plot, weights=list(models.values()))
    print(json.dumps({"mean": mean, "mean_over_seeds": over_seeds, "training": result["training"]}, indent=2))


if __name__ == "__main__":
    main()
