"""`metaapp evaluate seg --joint`: structures labelled in the same studies, predicted together as the
app predicts them. When an annotator's label of a study holds several structures (the cardiac
chambers, abdominal organs), the app adapts one head per structure on the same studies and an
inference gives each voxel to the most probable structure (`probabilities_to_labels`). Look-alike
structures then compete for their voxels instead of each head claiming both. Rows `meta` (each
structure predicted alone, as `evaluate seg` does) and `joint` come from the same heads and queries."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from monailabel_metaapp.core.adaptation import DEFAULT_ADAPT_STEPS, dice, probabilities_to_labels
from monailabel_metaapp.core.volume import stack_to_original
from monailabel_metaapp.evaluate import dice_row, setup


def evaluate_seg_joint(
    studies: str | Path,
    shots: list[int],
    labels: dict[str, int] | None = None,
    model: str | None = None,
    repeats: int = 3,
    queries: int = 8,
    seed: int = 0,
    device: str = "auto",
    steps: int = DEFAULT_ADAPT_STEPS,
) -> dict:
    """Dice of every structure predicted alone and together, from the same heads and queries.

    Args:
        studies: a datastore folder with final labels.
        shots: numbers of support studies (each holding every structure).
        labels: name -> label value (default: every value in the references).
        model: segmentation weights (default: the shipped ones).
        repeats: support draws per k.
        queries: query studies per draw.
        seed: seed of the draws.
        device: `auto`, `cpu` or `cuda`.
        steps: inner-loop steps of each head.
    """
    dev, adapter, data, labels = setup(studies, labels, model, device, steps)
    names, values = list(labels), list(labels.values())
    out = list(range(1, len(values) + 1))  # output values, as the app numbers its structures
    pool = [s for s in data if all((s.ref == v).any() for v in values)]
    results: dict[tuple, list[float]] = {}
    bar = tqdm(total=len(shots) * repeats, desc="evaluate (joint)", unit="episode")
    for k in shots:
        if len(pool) < k + 1:
            bar.update(repeats)
            continue
        for r in range(repeats):
            order = random.Random(f"{seed}-joint-{k}-{r}").sample(pool, len(pool))
            support, query = order[:k], order[k : k + queries]
            heads = [adapter.adapt([s.stack for s in support], [s.lstack == v for s in support]) for v in values]
            one_piece = [h.one_piece for h in heads]
            for q in query:
                probs = stack_to_original(adapter.predict(q.stack, heads), q.geom)
                together = probabilities_to_labels(probs, out, one_piece=one_piece)
                for j, (name, v) in enumerate(zip(names, values)):
                    alone = probabilities_to_labels(probs[j : j + 1], [1], one_piece=one_piece[j]) == 1
                    results.setdefault((name, k, "meta"), []).append(dice(alone, q.ref == v))
                    results.setdefault((name, k, "joint"), []).append(dice(together == out[j], q.ref == v))
            bar.update(1)
    bar.close()
    rows = [dice_row(n, k, m, d) for (n, k, m), d in results.items()]
    gains = {
        k: round(
            statistics.fmean(
                statistics.fmean(results[(n, k, "joint")]) - statistics.fmean(results[(n, k, "meta")]) for n in names
            ),
            4,
        )
        for k in shots
        if (names[0], k, "meta") in results
    }
    settings = {
        "studies": str(studies),
        "shots": shots,
        "labels": labels,
        "model": model or "shipped",
        "repeats": repeats,
        "queries": queries,
        "seed": seed,
        "device": str(dev),
        "adapt_steps": steps,
        "torch_threads": torch.get_num_threads(),
        "pool": len(pool),
    }
    return {"settings": settings, "rows": rows, "mean_gain_of_joint": gains}
