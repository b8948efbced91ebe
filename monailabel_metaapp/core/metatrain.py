"""Episodic meta-training (outer loop) with time budget, progress bar, atomic checkpoints, resume,
a JSON-lines log, and data parallelism under `torchrun` (gradients averaged across ranks)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from monailabel_metaapp.core.checkpoint import atomic_write, load_model, pick_device, save_model, sidecar
from monailabel_metaapp.core.episode_bank import KINDS, BankSampler, SliceBank, TaskShares
from monailabel_metaapp.core.episodes import EpisodeSampler, Study, read_studies, split_validation
from monailabel_metaapp.core.networks import FewShotSegModel, SegModelConfig
from monailabel_metaapp.core.objective import meta_objective
from monailabel_metaapp.core.profile import StepTimer


@dataclass
class MetaTrainConfig:
    minutes: float = 10.0
    max_steps: int = 0  # 0 = until the time budget is spent
    lambda_kl: float = 1e-3
    learned_lr: bool = True  # Meta-SGD; False keeps the inner-loop rates fixed at their init
    inner_steps: int = 3
    first_order: bool = False
    tasks_per_step: int = 4
    lr: float = 1e-3
    ssl_fraction: float = 0.5  # classic sampler: share of self-supervised (superpixel) tasks
    sampler: str = "classic"  # "classic" (`episodes.EpisodeSampler`) or "bank" (`episode_bank.BankSampler`)
    task_shares: dict = field(default_factory=dict)  # bank sampler: `episode_bank.TaskShares` fields
    batch_episodes: bool | None = None  # one encoder pass per step (`objective.meta_objective`); None: on CUDA
    exclude: list[int] = field(default_factory=list)  # label values held out of meta-training
    seed: int = 0
    checkpoint_seconds: float = 60.0
    val_every: int = 100
    val_tasks: int = 16
    # classification episodes only (see `ClsEpisodeSampler`); the defaults keep the original tasks
    cls_max_way: int = 0  # > n_way: each episode has n_way..cls_max_way classes
    cls_augment: float = 0.0  # augmentation strength of labelled (region / MedMNIST) tasks
    cls_abnormal_fraction: float = 0.0  # share of synthetic "normal vs abnormal" tasks


def init_distributed() -> tuple[int, int]:
    """(rank, world size): a process group under torchrun, (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(device: str, world: int) -> torch.device:
    """The device of this rank: its own GPU (LOCAL_RANK) under torchrun on CUDA."""
    dev = pick_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return dev


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def meta_train(
    studies: list[str | Path] | list[Study],
    out: str | Path,
    cfg: MetaTrainConfig | None = None,
    model_cfg: SegModelConfig | None = None,
    init: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    fresh: bool = False,
    profile_steps: int = 0,
) -> dict:
    """Meta-train on datastore folders (or preloaded studies / a saved bank); returns a summary.
    `profile_steps` > 0 times that many steps instead (`profile`), writing the split to `out`."""
    cfg = cfg or MetaTrainConfig()
    rank, world = init_distributed()
    dev = rank_device(device, world)
    torch.manual_seed(cfg.seed + rank)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if init:
        model = load_model(init)
        model.encoder.set_prior_to_current()
    else:
        model = FewShotSegModel(model_cfg or SegModelConfig())
    model.to(dev).train()
    if isinstance(studies[0], Study):
        bank = list(studies)
    else:
        bank = read_studies(studies, model.cfg.size, progress=progress and rank == 0)

    train_studies, val_studies = split_validation(bank, cfg.seed)
    if cfg.sampler == "bank":  # the weights record every share, defaults included
        cfg = replace(cfg, task_shares=TaskShares(**cfg.task_shares).to_dict())
    draw, val_sets = episode_sources(train_studies, val_studies, bank, model.cfg.context, cfg, dev, rank, progress)

    def validate() -> dict[str, float]:
        """Mean query loss of fixed validation tasks, per kind of task: `val_loss` is the labelled tasks'."""
        from monailabel_metaapp.core.objective import task_loss

        out = {}
        for name, eps in val_sets.items():
            losses = [float(task_loss(model, ep, cfg.inner_steps, True, sample=False).detach()) for ep in eps]
            out[name] = sum(losses) / len(losses)
        return out

    if cfg.batch_episodes is None:  # recorded with the weights as it was resolved
        cfg = replace(cfg, batch_episodes=dev.type == "cuda")

    def objective(episodes):
        return meta_objective(model, episodes, cfg.lambda_kl, cfg.inner_steps, cfg.first_order, cfg.batch_episodes)

    if profile_steps > 0:
        return profile(model, draw, objective, cfg, profile_steps, out, dev, world)
    return outer_loop(model, draw, objective, validate, cfg, out, dev, rank, world, progress, fresh)


def episode_sources(
    train: list[Study],
    val: list[Study],
    bank: list[Study],
    context: int,
    cfg: MetaTrainConfig,
    dev: torch.device,
    rank: int = 0,
    progress: bool = True,
) -> tuple[Callable[[int], list], dict[str, list]]:
    """(draw(n) -> n training episodes, fixed validation episodes by name) from the configured sampler.
    Validation tasks come from the held-out studies (plus one training study, so that a structure
    seen in only one validation study still has a pair): `val_loss` holds labelled tasks; the bank
    sampler adds one set per other kind it draws (`val_loss_merge`, `val_loss_superpixel`)."""
    exclude = set(cfg.exclude)
    labelled = [s for s in bank if s.label is not None]
    if cfg.sampler == "classic":
        sampler = EpisodeSampler(train, context, exclude, cfg.ssl_fraction, device=dev, seed=cfg.seed + 1000 * rank)
        vs = EpisodeSampler(val + labelled[:1], context, exclude, 0.0, device=dev, seed=12345) if val else None
        val_sets = {"val_loss": [vs.labelled_task() for _ in range(cfg.val_tasks)]} if vs and vs.by_value else {}
        return one_by_one(sampler.sample), val_sets
    if cfg.sampler != "bank":
        raise ValueError(f"sampler must be 'classic' or 'bank', got {cfg.sampler!r}")
    shares = TaskShares(**cfg.task_shares)
    sampler = BankSampler(SliceBank(train, context, shares, exclude, dev, progress and rank == 0), shares,
                          seed=cfg.seed + 1000 * rank)  # fmt: skip
    val_sets = {}
    if val:
        vb = BankSampler(
            SliceBank(val + labelled[:1], context, shares, exclude, dev, progress=False), shares, seed=12345
        )
        for kind in (k for k in KINDS if vb.bank.weights.get(k, 0) > 0):
            name = "val_loss" if kind == "labelled" else f"val_loss_{kind}"
            val_sets[name] = vb.sample_batch(cfg.val_tasks, kind)
    return sampler.sample_batch, val_sets


def profile(
    model: torch.nn.Module,
    draw: Callable[[int], list],
    objective: Callable[[list], tuple[torch.Tensor, dict[str, float]]],
    cfg: MetaTrainConfig,
    steps: int,
    out: Path,
    dev: torch.device,
    world: int = 1,
) -> dict:
    """`steps` outer steps (after one untimed warm-up step) billed by phase; prints the one-line split
    and writes it as JSON to `out`. No weights are written."""
    opt, params = make_optimizer(model, cfg)
    outer_step(model, opt, params, draw, objective, cfg.tasks_per_step, world)
    timer = StepTimer(dev)
    for _ in tqdm(range(steps), desc="profile", unit="step", disable=int(os.environ.get("RANK", 0)) != 0):
        outer_step(model, opt, params, draw, objective, cfg.tasks_per_step, world, timer)
    result = timer.to_dict() | {"device": str(dev), "world": world, "sampler": cfg.sampler,
                                "batch_episodes": cfg.batch_episodes, "tasks_per_step": cfg.tasks_per_step,
                                "line": timer.line()}  # fmt: skip
    if int(os.environ.get("RANK", 0)) == 0:
        print(timer.line())
        atomic_write(out, lambda p: Path(p).write_text(json.dumps(result, indent=2)))
    return result


def make_optimizer(model: torch.nn.Module, cfg: MetaTrainConfig) -> tuple[torch.optim.Adam, list]:
    """Adam on what the outer loop learns: every parameter, the inner-loop rates only with Meta-SGD."""
    params = [p for n, p in model.named_parameters() if cfg.learned_lr or not n.startswith("log_lr")]
    if not cfg.learned_lr:
        model.log_lr.requires_grad_(False)
    return torch.optim.Adam(params, lr=cfg.lr), params


def one_by_one(sample: Callable[[], Any]) -> Callable[[int], list]:
    """A `draw(n)` from a sampler that makes one episode per call."""
    return lambda n: [sample() for _ in range(n)]


def outer_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    params: list,
    draw: Callable[[int], list],
    objective: Callable[[list], tuple[torch.Tensor, dict[str, float]]],
    tasks_per_step: int,
    world: int = 1,
    timer: StepTimer | None = None,
) -> dict[str, float]:
    """One outer step: a batch of episodes (`draw(tasks_per_step)`), the meta-objective, gradients
    averaged across ranks under torchrun, clipped, one Adam step, the inner-loop rates and posterior
    widths kept in range. `timer` bills each phase's seconds (`profile.StepTimer`)."""
    opt.zero_grad(set_to_none=True)
    parts = add_gradients(draw, objective, tasks_per_step, world=world, timer=timer)
    apply_gradients(model, opt, params, world, timer)
    return parts


def add_gradients(
    draw: Callable[[int], list],
    objective: Callable[[list], tuple[torch.Tensor, dict[str, float]]],
    tasks: int,
    scale: float = 1.0,
    world: int = 1,
    timer: StepTimer | None = None,
) -> dict[str, float]:
    """Adds the gradients of `scale` x the meta-objective of `tasks` new episodes to those already held:
    an outer step's batch may be built in pieces (the server's site adaptation takes one task at a time,
    so that a request waits for one task, not a batch)."""
    phase = timer.phase if timer else lambda _name: nullcontext()
    with phase("sampling"):
        episodes = draw(tasks)
    with phase("forward"):
        loss, parts = objective(episodes)
    with phase("backward"):
        (loss * scale).backward()
    if timer:
        timer.episodes += len(episodes) * world
    return parts


def apply_gradients(
    model: torch.nn.Module, opt: torch.optim.Optimizer, params: list, world: int = 1, timer: StepTimer | None = None
) -> None:
    """The update of the gradients held: averaged across ranks under torchrun, clipped, one Adam step, the
    inner-loop rates and posterior widths kept in range."""
    phase = timer.phase if timer else lambda _name: nullcontext()
    with phase("all-reduce"):
        if world > 1:
            _average_gradients(model, world)
    with phase("optimiser"):
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        with torch.no_grad():
            for v in model.log_lr.values():
                v.clamp_(-8, 1)
            for v in model.encoder.log_sigma.values():
                v.clamp_(max=math.log(model.cfg.prior_sigma))
    if timer:
        timer.steps += 1


def any_rank(flag: bool, dev: torch.device, world: int = 1) -> bool:
    """True when `flag` is true on any rank: every rank must stop on the same step, or the gradient
    all-reduce would hang."""
    if world <= 1:
        return flag
    t = torch.tensor([float(flag)], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def check_resumable_config(out: Path, config: dict) -> None:
    """A resumed run must keep the architecture and preprocessing it started with (e.g. the
    classifier's image crop): refuse, with the differences, rather than mix two setups in one model."""
    side = sidecar(out)
    if not side.exists():
        return
    before = json.loads(side.read_text()).get("config", {})
    now = json.loads(json.dumps(config))
    diff = {k: (before[k], now.get(k)) for k in before if before[k] != now.get(k)}
    if diff:
        changes = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{out} was meta-trained with other settings ({changes}); keep them to resume, or pass --fresh"
        )


def best_weights_path(out: str | Path) -> Path:
    """Where a meta-training run keeps its best-validated weights (`OUT.best.pt`, with a sidecar)."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".pt") + ".best.pt")


def outer_loop(
    model: torch.nn.Module,
    draw: Callable[[int], list],
    objective: Callable[[list], tuple[torch.Tensor, dict[str, float]]],
    validate: Callable[[], dict[str, float]],
    cfg: MetaTrainConfig,
    out: Path,
    dev: torch.device,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    fresh: bool = False,
) -> dict:
    """The outer loop shared by segmentation and classification: Adam on the shared layers, the head
    initialisation and (Meta-SGD) the inner-loop rates; time budget, checkpoints, resume, log.
    Each validation that beats every earlier one of this run, the starting weights' included, also
    writes `OUT.best.pt`: a long run can drift past its best point, and the best-validated weights
    are the ones to ship (none are written when nothing beats the start)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = Path(str(out) + ".state.pt")
    best_path = best_weights_path(out)
    log_path = Path(str(out) + ".log.jsonl")
    opt, params = make_optimizer(model, cfg)
    step, elapsed, best_val = 0, 0.0, float("inf")
    if state_path.exists() and not fresh:
        check_resumable_config(out, model.cfg.to_dict())
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, elapsed = int(st["step"]), float(st["elapsed"])
        best_val = float(st.get("best_val", best_val))
        if rank == 0:
            print(f"resuming from {state_path} at step {step} ({elapsed / 60:.1f} min done)")

    def checkpoint() -> None:
        if rank != 0:
            return
        info = {"meta_train": asdict(cfg), "steps": step, "minutes": round(elapsed / 60, 2)}
        save_model(model, out, info)
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "elapsed": elapsed,
            "best_val": best_val,
        }
        atomic_write(state_path, lambda p: torch.save(state, p))

    def keep_if_best(val: dict[str, float]) -> None:
        nonlocal best_val
        if rank == 0 and val.get("val_loss", float("inf")) < best_val:
            best_val = val["val_loss"]
            info = {"meta_train": asdict(cfg), "steps": step, "minutes": round(elapsed / 60, 2), "val_loss": best_val}
            save_model(model, best_path, info)

    budget = cfg.minutes * 60
    bar = tqdm(
        total=int(budget), unit="s", desc="meta-train", disable=not (progress and rank == 0), initial=int(elapsed)
    )
    last_ckpt, ema, t_prev = time.time(), None, time.time()
    log = open(log_path, "a" if step else "w", buffering=1) if rank == 0 else None  # a resumed run appends
    if step == 0:  # the starting weights' validation: `OUT.best.pt` is written only for weights that beat it
        start_val = validate()
        best_val = start_val.get("val_loss", best_val)
        if log and start_val:
            log.write(json.dumps({"step": 0, "seconds": 0.0} | {k: round(v, 4) for k, v in start_val.items()}) + "\n")
    while True:
        if any_rank(elapsed >= budget or (cfg.max_steps > 0 and step >= cfg.max_steps), dev, world):
            break
        parts = outer_step(model, opt, params, draw, objective, cfg.tasks_per_step, world)
        step += 1
        now = time.time()
        elapsed += now - t_prev
        bar.update(int(elapsed) - bar.n)
        t_prev = now
        ema = parts["task"] if ema is None else 0.95 * ema + 0.05 * parts["task"]
        rec = {
            "step": step,
            "seconds": round(elapsed, 1),
            "task_loss": round(parts["task"], 4),
            "kl": round(parts["kl"], 4),
        } | {k: round(v, 4) for k, v in parts.items() if k.startswith("task_")}
        if step % cfg.val_every == 0:
            val = validate()
            keep_if_best(val)
            rec |= {k: round(v, 4) for k, v in val.items()}
        bar.set_postfix(loss=f"{ema:.3f}", **({"val": rec["val_loss"]} if "val_loss" in rec else {}))
        if log:
            log.write(json.dumps(rec) + "\n")
        if now - last_ckpt > cfg.checkpoint_seconds:
            checkpoint()
            last_ckpt = now
    bar.close()
    final_val = validate()  # empty without validation studies: no validation loss, not NaN in the log
    keep_if_best(final_val)
    checkpoint()
    if log:
        final = {"step": step, "seconds": round(elapsed, 1), "final": True}
        final |= {k: round(v, 4) for k, v in final_val.items()}
        log.write(json.dumps(final) + "\n")
        log.close()
    val_loss = final_val.get("val_loss", float("nan"))
    return {"steps": step, "minutes": elapsed / 60, "train_loss_ema": ema, "val_loss": val_loss, "out": str(out)}
