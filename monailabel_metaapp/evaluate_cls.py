"""`metaapp evaluate cls`: few-shot classification on a MedMNIST-layout file (`--npz`) or on the class
corrections stored in a MONAI Label datastore folder by the app (`--studies`), with baselines.

For each k and repeat, k support examples per class are drawn (seeded) from the train split; the
whole test split is classified. Methods, all in the same run on the same supports:
* `meta`    - the product: the meta-learned encoder, the prototype-initialised head adapted with
              the learned per-parameter rates;
* `linear`  - logistic regression on the frozen meta-learned features;
* `scratch` - a torchvision ResNet-18 from random init trained on the support.
Accuracy, balanced accuracy and ROC AUC (macro one-vs-rest beyond two classes).

With `--studies DIR`, the examples are the class corrections of `DIR/datastore_v2.json` (image
info `metaapp_classes`, what `PUT /metaapp/classes/{id}` stores), seen exactly as the app sees them,
one evaluation per task (`image`, `region` and any named task): per repeat k examples per class are
the support and every other example is classified. The folder is only read."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from tqdm import tqdm

from monailabel_metaapp.core.checkpoint import load_cls_model, pick_device
from monailabel_metaapp.core.cls_data import ClsSet, load_medmnist
from monailabel_metaapp.core.cls_model import DEFAULT_CLS_STEPS, FewShotClsModel, adapt
from monailabel_metaapp.evaluate_common import int_list, name_list, plot_curves, write_result


def scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """ROC AUC (macro one-vs-rest beyond two classes), accuracy and balanced accuracy.

    Args:
        y: (N,) true classes.
        proba: (N, C) predicted probabilities.
    """
    pred = proba.argmax(1)
    if proba.shape[1] == 2:
        auc = roc_auc_score(y, proba[:, 1])
    else:
        auc = roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=list(range(proba.shape[1])))
    return {"auc": float(auc), "acc": float(accuracy_score(y, pred)), "bacc": float(balanced_accuracy_score(y, pred))}


def support_indices(labels: torch.Tensor, k: int, rng: np.random.Generator) -> np.ndarray:
    """k examples per class drawn without replacement; ValueError when a class has fewer.

    Args:
        labels: (N,) classes of the pool.
        k: shots per class.
        rng: the random source.
    """
    idx = []
    for c in sorted(int(c) for c in torch.unique(labels)):
        pool = torch.nonzero(labels == c).flatten().numpy()
        if len(pool) < k:
            raise ValueError(f"class {c} has {len(pool)} training examples, fewer than {k} shots")
        idx.append(rng.choice(pool, k, replace=False))
    return np.concatenate(idx)


@torch.no_grad()
def embed(model: FewShotClsModel, images: torch.Tensor, dev: torch.device, batch: int = 256) -> torch.Tensor:
    """(N, V, size, size) views -> (N, D) features, in batches.

    Args:
        model: the classifier.
        images: the views.
        dev: where to compute.
        batch: examples per batch.
    """
    return torch.cat([model.embed(images[i : i + batch].to(dev)) for i in range(0, len(images), batch)])


def run_meta(model, f_s, y_s, f_test, n_way, steps) -> tuple[np.ndarray, float]:
    """The product: adapt the head on the support features, classify the test features.

    Args:
        model: the classifier.
        f_s: support features.
        y_s: support classes.
        f_test: features to classify.
        n_way: the number of classes.
        steps: inner-loop steps.

    Returns:
        (probabilities, seconds the adaptation took).
    """
    t0 = time.perf_counter()
    params = adapt(model, f_s, y_s, n_way, steps)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        proba = F.softmax(model.head.logits(f_test, params), 1)
    return proba.cpu().numpy(), seconds


def run_linear(f_s, y_s, f_test) -> tuple[np.ndarray, float]:
    """Baseline: logistic regression on the frozen features.

    Args:
        f_s: support features.
        y_s: support classes.
        f_test: features to classify.

    Returns:
        (probabilities, seconds the fit took).
    """
    t0 = time.perf_counter()
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(f_s.cpu().numpy(), y_s.cpu().numpy())
    return clf.predict_proba(f_test.cpu().numpy()), time.perf_counter() - t0


def run_scratch(x_s, y_s, x_test, n_way, dev, steps: int = 150, seed: int = 0) -> tuple[np.ndarray, float]:
    """ResNet-18 (torchvision, random init, 1-channel stem) trained on the support with flips.

    Args:
        x_s: support views (the first view is used).
        y_s: support classes.
        x_test: views to classify.
        n_way: the number of classes.
        dev: where to train.
        steps: Adam steps.
        seed: the random seed.

    Returns:
        (probabilities, seconds the training took).
    """
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    net = resnet18(weights=None, num_classes=n_way)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    net.to(dev).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = x_s[:, :1].to(dev), y_s.to(dev)  # first view only
    t0 = time.perf_counter()
    for _ in range(steps):
        xb = torch.where(torch.rand(len(x), 1, 1, 1, device=dev) < 0.5, x.flip(-1), x)
        loss = F.cross_entropy(net(xb), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        proba = torch.cat([F.softmax(net(x_test[i : i + 256, :1].to(dev)), 1) for i in range(0, len(x_test), 256)])
    return proba.cpu().numpy(), seconds


def summary_row(shots: int, method: str, runs: list[dict]) -> dict:
    """One row of the results: scores over the repeats of one (shots, method).

    Args:
        shots: examples per class.
        method: "meta", "linear", "scratch", ...
        runs: each repeat's scores and seconds.
    """
    return {
        "shots": shots,
        "method": method,
        "auc_mean": float(np.mean([x["auc"] for x in runs])),
        "auc_std": float(np.std([x["auc"] for x in runs])),
        "acc_mean": float(np.mean([x["acc"] for x in runs])),
        "bacc_mean": float(np.mean([x["bacc"] for x in runs])),
        "n": len(runs),
        "adapt_seconds": float(np.median([x["seconds"] for x in runs])),
    }


def evaluate_cls(
    data: str | Path,
    model_path: str | Path,
    shots: list[int],
    repeats: int = 5,
    baselines: list[str] | None = None,
    seed: int = 0,
    steps: int = DEFAULT_CLS_STEPS,
    device: str = "auto",
    progress: bool = True,
    query_split: str = "test",
) -> dict:
    """Few-shot classification, the product against baselines, on a MedMNIST-layout file or on the
    class corrections stored in a datastore folder (the two sources of `metaapp evaluate cls`).

    Args:
        data: a MedMNIST-layout file (a .npz, or any file), or a datastore folder with
            `datastore_v2.json` (read only; per task, k stored corrections per class are the support
            and the others the queries).
        model_path: the meta-trained classifier.
        shots: the k values (examples per class).
        repeats: supports drawn per k.
        baselines: of "linear", "scratch" (None: both on a file, "linear" on a folder; "scratch" is
            not run on stored corrections).
        seed: the seed of the supports.
        steps: the head's inner-loop steps.
        device: "auto", "cpu", "cuda", ...
        progress: show a progress bar (a file).
        query_split: (a file) "val" classifies the validation split instead (for choices; the test
            split is for reporting).
    """
    if Path(data).suffix != ".npz" and not Path(data).is_file():
        return _evaluate_store(Path(data), model_path, shots, repeats, baselines, seed, steps, device)
    npz = data
    dev = pick_device(device)
    model = load_cls_model(model_path, dev)
    baselines = ["scratch", "linear"] if baselines is None else baselines
    train: ClsSet = load_medmnist(npz, "train", model.cfg.size, model.cfg.image_crop)
    test: ClsSet = load_medmnist(npz, query_split, model.cfg.size, model.cfg.image_crop)
    n_way = len(train.classes())
    if train.classes() != list(range(n_way)):
        raise ValueError(f"class labels must be 0..{n_way - 1}, got {train.classes()}")
    f_train, f_test = embed(model, train.images, dev), embed(model, test.images, dev)
    y_test = test.labels.numpy()
    results: dict[tuple[int, str], list[dict]] = {}
    bar = tqdm(total=len(shots) * repeats, desc="evaluate cls", disable=not progress)
    for k in shots:
        for r in range(repeats):
            rng = np.random.default_rng(seed * 1000 + r)
            idx = torch.from_numpy(support_indices(train.labels, k, rng))
            y_s = train.labels[idx].to(dev)
            runs = {"meta": run_meta(model, f_train[idx], y_s, f_test, n_way, steps)}
            if "linear" in baselines:
                runs["linear"] = run_linear(f_train[idx], y_s, f_test)
            if "scratch" in baselines:
                runs["scratch"] = run_scratch(train.images[idx], y_s, test.images, n_way, dev, seed=r)
            for method, (proba, seconds) in runs.items():
                results.setdefault((k, method), []).append({**scores(y_test, proba), "seconds": seconds})
            bar.update(1)
    bar.close()
    rows = [summary_row(k, method, rs) for (k, method), rs in results.items()]
    settings = {
        "npz": str(npz),
        "model": str(model_path),
        "shots": shots,
        "repeats": repeats,
        "seed": seed,
        "baselines": baselines,
        "steps": steps,
        "device": str(dev),
        "classes": n_way,
        "image_crop": model.cfg.image_crop,
        "query_split": query_split,
        "test_examples": len(y_test),
        "torch_threads": torch.get_num_threads(),
    }
    return {"rows": rows, "settings": settings}


def _evaluate_store(
    studies: Path,
    model_path: str | Path,
    shots: list[int],
    repeats: int,
    baselines: list[str] | None,
    seed: int,
    steps: int,
    device: str,
) -> dict:
    """`evaluate_cls` on a datastore folder (the stored class corrections)."""
    import tempfile

    from monailabel.config import settings as ml_settings

    from monailabel_metaapp.core.episodes import label_names
    from monailabel_metaapp.lib.cls.service import ClsService
    from monailabel_metaapp.lib.datastore import ValidatingDatastore

    if not (studies / "datastore_v2.json").exists():
        raise FileNotFoundError(f"{studies}/datastore_v2.json does not exist: not a datastore the app has served")
    baselines = ["linear"] if baselines is None else [b for b in baselines if b != "scratch"]
    ds = ValidatingDatastore(
        str(studies),
        extensions=ml_settings.MONAI_LABEL_DATASTORE_FILE_EXT,
        auto_reload=False,
        read_only=True,
        default_names={n: v for v, n in label_names(studies).items()},
    )
    rows, notes, sizes = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        svc = ClsService(ds, tmp, model_path, device=device, steps=steps)
        for task, kind in sorted(svc.tasks().items()):
            views, names = [], []
            for image_id, key, rec in svc.examples(task):
                try:
                    views.append(svc.views(image_id, rec))
                    names.append(rec["class"])
                except (LookupError, ValueError) as e:
                    notes.append(f"{task} {image_id} {key}: skipped ({e})")
            classes = sorted(set(names))
            counts = {c: names.count(c) for c in classes}
            sizes[task] = counts
            if len(classes) < 2:
                notes.append(f"{task}: examples of {classes or 'no class'}; 2 classes are needed")
                continue
            feats = svc.embed(views).to(svc.device)
            y = torch.tensor([classes.index(n) for n in names])
            for k in shots:
                if min(counts.values()) <= k:
                    notes.append(f"{task}, k={k}: a class has {min(counts.values())} examples, not more than k")
                    continue
                results: dict[str, list[dict]] = {}
                for r in range(repeats):
                    rng = np.random.default_rng(seed * 1000 + r)
                    idx = support_indices(y, k, rng)
                    query = np.setdiff1d(np.arange(len(y)), idx)
                    y_s = y[idx].to(svc.device)
                    runs = {"meta": run_meta(svc.model, feats[idx], y_s, feats[query], len(classes), steps)}
                    if "linear" in baselines:
                        runs["linear"] = run_linear(feats[idx], y_s, feats[query])
                    for method, (proba, sec) in runs.items():
                        results.setdefault(method, []).append({**scores(y[query].numpy(), proba), "seconds": sec})
                rows += [{"task": task, "kind": kind, **summary_row(k, f"{task} {m}", rs)} for m, rs in results.items()]
    if not rows:
        raise ValueError(f"nothing to evaluate in {studies}: " + "; ".join(notes or ["no class corrections stored"]))
    settings = {"studies": str(studies), "model": str(model_path), "shots": shots, "repeats": repeats, "seed": seed}
    settings.update({"baselines": baselines, "steps": steps, "device": str(svc.device), "examples": sizes})
    return {"rows": rows, "settings": settings, "notes": notes}


def plot(result: dict, png: Path) -> None:
    """ROC AUC against shots per class, one curve per method.

    Args:
        result: what `evaluate_cls` returns.
        png: the image to write.
    """
    settings = result["settings"]
    title = Path(settings.get("npz") or settings["studies"]).name
    plot_curves(
        result["rows"],
        png,
        "auc_mean",
        "auc_std",
        "ROC AUC on the test split",
        "shots per class",
        title=title,
        panel=(6, 4),
        xticks=settings["shots"],
    )


def run_from_args(a: argparse.Namespace) -> dict:
    """`metaapp evaluate cls`: evaluate, write the JSON and its plot, print the rows.

    Args:
        a: the parsed command line (`--npz` or `--studies`, `--model`, `--shots`, `--baselines`, ...).
    """
    if not a.npz and not a.studies:
        raise ValueError("evaluate cls needs --npz FILE (MedMNIST layout) or --studies DIR (stored class corrections)")
    if a.studies:
        from monailabel_metaapp.lib.cls.classifier import DEFAULT_CLS_WEIGHTS

        data, baselines, model = a.studies, name_list(a.baselines, "linear"), a.model or DEFAULT_CLS_WEIGHTS
    else:
        if not a.model:
            raise ValueError("evaluate cls --npz needs --model FILE (made by `metaapp meta-train --task cls`)")
        data, baselines, model = a.npz, name_list(a.baselines, "scratch,linear"), a.model
    result = evaluate_cls(data, model, int_list(a.shots), a.repeats, baselines, a.seed, a.steps, a.device)
    write_result(result, a.out, plot, weights=[model])
    for r in result["rows"]:
        print(
            f"k={r['shots']:>2} {r['method']:>8}: AUC {r['auc_mean']:.3f} ± {r['auc_std']:.3f}, acc {r['acc_mean']:.3f}"
        )
    return result
