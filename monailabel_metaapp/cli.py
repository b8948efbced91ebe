"""`metaapp` command line: serve, pacs, samples, bank, meta-train, adapt-site, distill, evaluate, simulate-al.
Imports are per command so `meta-train` runs on a bare GPU machine without MONAI Label installed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _serve(a: argparse.Namespace) -> None:
    from monailabel_metaapp.server import serve

    serve(a.studies, host=a.host, port=a.port, conf=dict(a.conf or []), build_samples=a.studies == "sample_studies")


def _pacs(a: argparse.Namespace) -> None:
    from pathlib import Path

    from monailabel_metaapp.pacs.orthanc import missing, serve_with_pacs

    if missing():
        raise FileNotFoundError(missing())
    if a.studies == "sample_studies" and not Path(a.studies).exists():
        from monailabel_metaapp.samples import build_samples

        build_samples(a.studies)
    if not Path(a.studies).is_dir():
        raise FileNotFoundError(f"studies folder {a.studies!r} does not exist")
    serve_with_pacs(a.studies, a.pacs_dir, a.orthanc_port, a.port, a.modality, dict(a.conf or []))


def _samples(a: argparse.Namespace) -> None:
    from monailabel_metaapp.samples import build_samples

    ids = build_samples(a.out, n_studies=a.n, seed=a.seed)
    print(f"wrote {len(ids)} studies to {a.out}")


def _bank(a: argparse.Namespace) -> None:
    from monailabel_metaapp.core.episodes import load_studies, save_bank

    studies = load_studies(a.studies, a.size)
    if a.unlabelled:
        for s in studies:
            s.label = None
    save_bank(studies, a.out)
    print(f"wrote {len(studies)} studies ({sum(s.image.shape[0] for s in studies)} slices) to {a.out}")


def config_from_args(cls, a: argparse.Namespace, **given):
    """A settings dataclass from the parsed options of the same names, plus `given` fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{n: getattr(a, n) for n in names if getattr(a, n, None) is not None} | given)


def _meta_train(a: argparse.Namespace) -> None:
    from monailabel_metaapp.core.metatrain import MetaTrainConfig, meta_train
    from monailabel_metaapp.core.networks import SegModelConfig

    check_shares(a)
    cfg = config_from_args(
        MetaTrainConfig,
        a,
        learned_lr=not a.fixed_lr,
        cls_max_way=a.max_way,
        cls_augment=a.cls_augment,
        cls_abnormal_fraction=a.abnormal_fraction,
        task_shares=parse_shares(a.task_shares),
    )
    if a.task == "cls":
        from monailabel_metaapp.core.cls_metatrain import meta_train_cls
        from monailabel_metaapp.core.cls_model import ClsModelConfig

        if a.init or a.exclude or a.profile or a.sampler != "classic" or a.batch_episodes is not None:
            raise ValueError("--init, --exclude, --profile, --sampler and --batch-episodes are for --task seg")
        mcfg = ClsModelConfig() if a.image_crop is None else ClsModelConfig(image_crop=a.image_crop)
        summary = meta_train_cls(a.studies, a.out, cfg, mcfg, a.n_way, a.k_shot, device=a.device, fresh=a.fresh)
    else:
        if a.image_crop is not None:
            raise ValueError("--image-crop is for --task cls")
        mcfg = SegModelConfig(size=a.size, context=a.context)
        summary = meta_train(
            a.studies, a.out, cfg, mcfg, init=a.init, device=a.device, fresh=a.fresh, profile_steps=a.profile
        )
        if a.profile:
            return  # the profile line is printed, the JSON written to --out
    print(json.dumps(summary, indent=2, default=str))


def parse_shares(items: list[str] | None) -> dict:
    """`KEY=VALUE` items of `--task-shares` -> `episode_bank.TaskShares` fields, checked by name."""
    from monailabel_metaapp.core.episode_bank import TaskShares

    known = {f.name for f in dataclasses.fields(TaskShares)}
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--task-shares takes KEY=VALUE with KEY one of {', '.join(sorted(known))}; got {item!r}")
        if key == "superpixel_scales":
            out[key] = tuple(int(v) for v in value.split(","))
        else:
            out[key] = int(value) if key == "superpixel_slices" else float(value)
    return out


def add_sampler_args(s: argparse.ArgumentParser) -> None:
    """`--sampler` and `--task-shares`, the same for meta-train and adapt-site."""
    s.add_argument(
        "--sampler",
        choices=["classic", "bank"],
        default="classic",
        help="seg: classic (one episode at a time) or bank (slices on the training device, a step's episodes cut "
        "and augmented together, label merges, superpixels at several scales, modality shifts)",
    )
    s.add_argument(
        "--task-shares",
        nargs="*",
        metavar="KEY=VALUE",
        help="bank sampler: labelled=, merge=, superpixel= shares; superpixel_scales=60,100,200; "
        "superpixel_slices= (per study, 0: all); intensity_prob=; elastic= (defaults in docs/meta_training.md)",
    )


def check_shares(a: argparse.Namespace) -> None:
    """`--task-shares` weights the bank sampler's tasks: refused with the classic sampler."""
    if a.task_shares and a.sampler != "bank":
        raise ValueError("--task-shares sets the bank sampler's tasks: add --sampler bank")


def _adapt_site(a: argparse.Namespace) -> None:
    from monailabel_metaapp.core.site_adaptation import SiteAdaptation, adapt_site

    trainer = SiteAdaptation
    if a.task == "cls":
        from monailabel_metaapp.core.cls_site_adaptation import ClsSiteAdaptation

        trainer = ClsSiteAdaptation
        if a.sampler != "classic" or a.task_shares:
            raise ValueError("--sampler and --task-shares are for --task seg")
    if a.sampler == "bank" and a.ssl_task != "superpixel":
        raise ValueError("--sampler bank draws superpixel tasks: leave --ssl-task at superpixel")
    check_shares(a)
    cfg = config_from_args(trainer.config_class, a, task_shares=parse_shares(a.task_shares))
    summary = adapt_site(
        a.studies,
        a.out,
        a.init,
        a.minutes,
        cfg,
        a.device,
        a.check_minutes,
        fresh=a.fresh,
        keep_candidates=a.keep,
        trainer=trainer,
    )
    print(json.dumps(summary, indent=2, default=str))


def _distill(a: argparse.Namespace) -> None:
    from monailabel_metaapp.core.cls_model import ClsModelConfig
    from monailabel_metaapp.core.distill import distill_cls
    from monailabel_metaapp.core.metatrain import MetaTrainConfig

    cfg = MetaTrainConfig(minutes=a.minutes, max_steps=a.max_steps, tasks_per_step=a.tasks_per_step, seed=a.seed)
    student = ClsModelConfig.from_channels(a.student_channels) if a.student_channels else None
    summary = distill_cls(a.teacher, a.studies, a.out, cfg, student, a.n_way, a.k_shot, a.device, fresh=a.fresh)
    print(json.dumps(summary, indent=2, default=str))


def _evaluate(a: argparse.Namespace) -> None:
    if a.task == "cls":
        from monailabel_metaapp.evaluate_cls import run_from_args
    elif a.task == "clicks":
        from monailabel_metaapp.evaluate_clicks import run_from_args
    else:
        from monailabel_metaapp.evaluate import run_from_args
    run_from_args(a)


def _simulate_al(a: argparse.Namespace) -> None:
    from monailabel_metaapp.simulate_al import simulate_al

    strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    r = simulate_al(
        a.studies,
        a.structure,
        strategies,
        a.budget,
        a.repeats,
        a.eval_studies,
        a.pool,
        a.seed,
        a.out,
        seconds_per_study=a.seconds_per_study,
    )
    print(json.dumps({k: {m: v[m] for m in v if m != "curve"} for k, v in r["summary"].items()}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaapp", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start the MONAI Label server with this app")
    s.add_argument("--studies", default="sample_studies", help="datastore folder (or DICOMweb URL)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help="app conf, repeatable")
    s.set_defaults(func=_serve)

    s = sub.add_parser("pacs", help="start Orthanc with the studies as DICOM, and the app against it (OHIF too)")
    s.add_argument("--studies", default="sample_studies", help="datastore folder loaded into the PACS once")
    s.add_argument("--pacs-dir", default=".pacs", help="Orthanc's storage and the app's local cache")
    s.add_argument("--orthanc-port", type=int, default=8042)
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--modality", default="MR", help="modality of the loaded series (and the app's search filter)")
    s.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help="app conf, repeatable")
    s.set_defaults(func=_pacs)

    s = sub.add_parser("samples", help="build sample_studies/ from the MNI152 template bundled in nilearn")
    s.add_argument("--out", default="sample_studies")
    s.add_argument("--n", type=int, default=6)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_samples)

    s = sub.add_parser("bank", help="preprocess datastore folders into one .npz for meta-training elsewhere")
    s.add_argument("--studies", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--size", type=int, default=160)
    s.add_argument("--unlabelled", action="store_true", help="drop labels (self-supervised tasks only)")
    s.set_defaults(func=_bank)

    s = sub.add_parser("meta-train", help="episodic meta-training of the few-shot segmentation or classification model")
    s.add_argument("--task", choices=["seg", "cls"], default="seg")
    s.add_argument(
        "--studies",
        nargs="+",
        required=True,
        help="seg: datastore folders or .npz banks; cls: MedMNIST-layout .npz files and/or seg banks (regions); "
        "unlabelled:FILE.npz adds only the train images of a MedMNIST file (its labels are never read)",
    )
    s.add_argument("--n-way", type=int, default=2, help="cls: classes per episode")
    s.add_argument("--k-shot", type=int, default=5, help="cls: support examples per class")
    s.add_argument("--max-way", type=int, default=0, help="cls: episodes of n-way..max-way classes")
    s.add_argument("--cls-augment", type=float, default=0.0, help="cls: augmentation strength of labelled tasks")
    s.add_argument("--abnormal-fraction", type=float, default=0.0, help="cls: share of synthetic normal/abnormal tasks")
    s.add_argument(
        "--image-crop",
        type=float,
        help="cls: whole images are seen through this central fraction (default 0.8, cls_data.IMAGE_CROP; "
        "1: uncropped). Kept with the weights: evaluation and the app crop alike",
    )
    s.add_argument("--out", required=True, help="weights file to write (checkpointed, resumable)")
    s.add_argument("--init", help="start from these weights (the prior is centred on them)")
    s.add_argument("--minutes", type=float, default=10.0)
    s.add_argument("--max-steps", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto|cpu|cuda")
    s.add_argument("--lambda-kl", type=float, default=1e-3, help="weight of KL(q||p); 0 turns it off")
    s.add_argument("--fixed-lr", action="store_true", help="ablation: fixed inner-loop rates (no Meta-SGD)")
    s.add_argument("--inner-steps", type=int, default=3)
    s.add_argument("--tasks-per-step", type=int, default=4)
    s.add_argument(
        "--ssl-fraction", type=float, default=0.5, help="classic sampler: share of self-supervised (superpixel) tasks"
    )
    add_sampler_args(s)
    s.add_argument(
        "--batch-episodes",
        action=argparse.BooleanOptionalAction,
        help="seg: one encoder pass for all episodes of a step (default: on CUDA only; slower on a CPU)",
    )
    s.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="seg: time N steps, print `profile: sampling X%%, ...`, write it as JSON to --out (no weights)",
    )
    s.add_argument("--exclude", type=int, nargs="*", default=[], help="label values held out of meta-training")
    s.add_argument("--size", type=int, default=160)
    s.add_argument("--context", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint-seconds", type=float, default=60.0)
    s.add_argument("--fresh", action="store_true", help="ignore an existing OUT.state.pt instead of resuming")
    s.set_defaults(func=_meta_train)

    s = sub.add_parser(
        "adapt-site", help="site adaptation: the encoder keeps meta-training on a site's images, guarded"
    )
    s.add_argument(
        "--task",
        choices=["seg", "cls"],
        default="seg",
        help="seg: the segmentation encoder; cls: the classifier's (UMTRA tasks on the images)",
    )
    s.add_argument(
        "--studies",
        nargs="+",
        required=True,
        help="seg: datastore folders (labels optional) or .npz banks; cls: image folders (PNG, NIfTI, ...) "
        "or unlabelled:FILE.npz (the train images of a MedMNIST-layout file; its labels are never read)",
    )
    s.add_argument("--minutes", type=float, required=True, help="training time budget")
    s.add_argument("--out", required=True, help="weights the guard chose (the candidate, or the --init weights)")
    s.add_argument("--init", help="starting weights, the prior's centre (default: the shipped model of --task)")
    s.add_argument("--device", default="auto", help="auto|cpu|cuda")
    s.add_argument("--check-minutes", type=float, default=0.0, help="also check the candidate every N minutes")
    s.add_argument("--keep-candidates", dest="keep", action="store_true", help="keep each checked candidate")
    s.add_argument("--margin", type=float, default=0.0, help="the candidate must be better by more than this")
    s.add_argument(
        "--swap-unlabelled",
        action="store_true",
        default=None,
        help="cls: without class corrections, let the self-supervised loss choose the candidate (off: only reported)",
    )
    s.add_argument("--lambda-kl", type=float, default=1e-3)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--tasks-per-step", type=int, help="episodes per outer step (default: seg 4, cls 8)")
    s.add_argument(
        "--ssl-fraction", type=float, default=0.5, help="share of self-supervised tasks when labelled tasks exist"
    )
    s.add_argument(
        "--ssl-task",
        choices=["superpixel", "supervoxel"],
        default="superpixel",
        help="seg: self-supervised task; superpixel: one slice, two augmentations; supervoxel: a 3D region, "
        "support and query on different slices",
    )
    add_sampler_args(s)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint-seconds", type=float, default=60.0)
    s.add_argument("--fresh", action="store_true", help="ignore an existing OUT.state.pt instead of resuming")
    s.set_defaults(func=_adapt_site)

    s = sub.add_parser("distill", help="model-aware distillation of a meta-trained classifier into a compact one")
    s.add_argument("--teacher", required=True, help="classifier weights from `meta-train --task cls`")
    s.add_argument("--studies", nargs="+", required=True, help="the same kinds of sources as meta-train --task cls")
    s.add_argument("--out", required=True)
    s.add_argument("--student-channels", help="e.g. 8,16,16,16 (default: half the teacher's width)")
    s.add_argument("--minutes", type=float, default=10.0)
    s.add_argument("--max-steps", type=int, default=0)
    s.add_argument("--tasks-per-step", type=int, default=4)
    s.add_argument("--n-way", type=int, default=2)
    s.add_argument("--k-shot", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--fresh", action="store_true")
    s.set_defaults(func=_distill)

    s = sub.add_parser("evaluate", help="few-shot evaluation with baselines")
    s.add_argument("task", choices=["seg", "cls", "clicks"])
    s.add_argument(
        "--studies", help="seg, clicks: datastore folder with final labels; cls: one with stored class corrections"
    )
    s.add_argument("--npz", help="cls: MedMNIST-layout file (train_/test_ images and labels)")
    s.add_argument("--steps", type=int, default=20, help="cls: inner-loop steps of the head")
    s.add_argument("--shots", default="1,3,5")
    s.add_argument("--labels", help='JSON {"name": value}; default: every non-zero value')
    s.add_argument("--model", help="weights (default: the shipped checkpoint)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--queries", type=int, default=8)
    s.add_argument(
        "--baselines",
        default=None,
        help="seg: scratch,finetune,proto (default); cls: scratch,linear; clicks: reset,random_walker",
    )
    s.add_argument("--clicks", type=int, default=10, help="clicks: simulated clicks per study")
    s.add_argument("--annotator", type=int, default=0, help="clicks: also the annotation loop over N studies")
    s.add_argument("--cap", type=int, default=20, help="clicks: most clicks per study in the annotation loop")
    s.add_argument(
        "--refine-seconds",
        type=float,
        default=0.0,
        help="clicks: also the product after S seconds of refinement since the last save (method meta_refined)",
    )
    s.add_argument("--scratch-seconds", type=float, default=150.0)
    s.add_argument("--protocol", choices=["volume", "oracle"], default="volume")
    s.add_argument(
        "--timeline",
        help="seg: seconds after the save, e.g. 2,10,30,60,150,300: Dice of what the app serves at each "
        "(quick head, then guarded refinement) against finetune and scratch given the same seconds",
    )
    s.add_argument(
        "--refine",
        default="",
        help="seg --timeline: refinement settings over the app's, e.g. distill=0,ema=0 (fields of RefineConfig)",
    )
    s.add_argument(
        "--joint",
        action="store_true",
        help="seg: structures adapted on the same studies and predicted together, as the app predicts a "
        "study whose labels hold several structures, beside each predicted alone",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_evaluate)

    s = sub.add_parser("simulate-al", help="active-learning curves through the app's REST API")
    s.add_argument("--studies", required=True, help="datastore folder whose final labels are the references")
    s.add_argument("--structure", required=True, help="name (from labels.json) or label value")
    s.add_argument("--strategies", default="all", help="comma list, e.g. random,first,hybrid; all = every one")
    s.add_argument("--budget", type=int, default=8, help="labels per run, the shared random start included")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--eval-studies", type=int, default=5, help="held-out studies Dice is measured on")
    s.add_argument("--pool", type=int, default=0, help="limit the pool to this many studies (0 = all the rest)")
    s.add_argument(
        "--seconds-per-study",
        type=float,
        default=0.0,
        help="seconds from each save to the next (background refinement on); 0 = back to back, refinement off",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="benchmarks/results/active_learning.json")
    s.set_defaults(func=_simulate_al)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"metaapp {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main(sys.argv[1:])
