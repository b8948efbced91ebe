"""Refinement of one structure after its quick head is live: the meta-learned encoder and the adapted
head fine-tuned end to end on all of the structure's labels, under a guard.

The quick head (seconds) learns only a few parameters on frozen features; a network trained end to
end keeps improving with time and labels. Refinement starts from the meta-learned encoder and the
adapted head, so it begins where the quick head is and only has to get better from there.

The guard holds out a block of every labelled study: the middle third of the slices that hold the
structure. The refined network trains on the rest of every study; a candidate is published only when
its Dice on the held-out slices of all studies together beats, by `RefineConfig.min_gain`, both the
quick head adapted on the same training slices and every candidate published before it. The blocks
are never trained on, and each study keeps its block as labels arrive, so a run continued warm after
a new label has still never seen them. Holding out the newest study whole instead would check on a
subject never trained on, but it costs that study's labels: at two labels the network trains on one
study, and on cardiac MRI at three labels the served Dice in the mean of four structures was 0.57
against 0.65 10 s after a save and 0.70 against 0.72 at 150 s.

What the guard judges and publishes is a moving average of the network's weights over its last few
dozen steps (`RefineConfig.ema`), not the weights of the last step: with a batch of 4 slices a step
moves the network by noise as much as by what it learned, and one step's luck on the held-out slices
is not what should go live.

With one labelled study the block is the only check, and the candidate is also distilled towards the
quick head on the anchor studies (`RefineConfig.distill`). Held-out slices of the one study alone
rewarded networks that learned where the structure sits in that study (on cardiac MRI a version
scored 0.85 on its held-out slices, the quick head 0.74, while its Dice on other studies fell from
0.40 to 0.12); fine-tuned with the quick head as a teacher on other studies, the network cannot drift
far from it there while it fits the labelled one.

From two labelled studies on, a second run trains the same network from fresh weights beside the
first, under the same guard (`TwoStartRefinement`): for a structure meta-training never saw, fresh
weights can be the better start. The run ahead on the held-out slices gets most of the seconds.

A candidate must also agree with the quick head on a few other studies of the site, unlabelled ones
included (`anchors`). Held-out slices of the labelled studies are a small check; the anchors keep a candidate from
contradicting the meta-learned head on the rest of the site. The head's predictions there are only as
good as the head, so the agreement asked for is a share (`RefineConfig.min_agreement`) of the head's
own held-out Dice (`agreement_needed`): a head that misses the structure cannot veto a
candidate that finds it (on held-out cardiac structures a fixed bar of 0.5 refused every candidate of
the myocardium and the RV blood pool, while the quick head scored 0.03-0.39 on a held-out study).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from monailabel_metaapp.core.adaptation import COMPONENT_KEY, Head, SegAdapter, largest_component_share
from monailabel_metaapp.core.episodes import augment, with_context
from monailabel_metaapp.core.inner_loop import seg_loss
from monailabel_metaapp.core.networks import FewShotSegModel, light_config
from monailabel_metaapp.core.precision import training_autocast

HEAD, REFINED = "head", "refined"  # the two stages a structure's live version can be in


@dataclass
class RefineConfig:
    """Settings of one structure's refinement.

    Args:
        lr_encoder: Adam learning rate of the encoder's weights. From two labels on, 1e-3 served more
            than 3e-4 at 150 s on 3 of 4 cardiac structures (mean 0.68 against 0.63); at one label
            the quick head as teacher keeps this pace from sinking a structure the model knows.
        lr_head: Adam learning rate of the head's parameters (prototypes, scale, bias, conv).
        batch: slices per step.
        augment: strength of the random affine/gamma/noise augmentation (`episodes.augment`).
        val_every: steps between two validations on the held-out slices.
        patience: validations without a new best before the run counts as a plateau.
        min_gain: Dice a candidate must gain over the best so far to be published.
        budget_seconds: seconds of refinement per set of labels (a new label grants a new budget).
        min_agreement: share of the quick head's held-out Dice that the mean Dice between a
            candidate's and the quick head's predictions on other studies (`anchors`) must reach.
        distill: with one labelled study, the weight of the distillation term: the candidate's
            predictions on slices of the anchor studies are pulled towards the quick head's (the
            teacher: the meta-learned network adapted to this structure). 0 trains on the label alone.
        distill_batch: anchor slices per step of the distillation term.
        bf16: run the encoder's forward pass of each training step under bfloat16 autocast where
            the hardware does it natively (`core.precision`): 1.4-1.5x the steps per second on a CPU
            with AVX512-BF16. Validation and what is served stay in float32.
        fresh: from this many labelled studies holding the structure on, a second run trains the same
            network from freshly drawn weights beside the run from the meta-learned ones under one
            guard (`TwoStartRefinement`, `start_refinement`); 0: never.
        fresh_emb: > 0: the fresh run trains a light network instead (MONAI's UNet, first convolution
            at stride 2, this many embedding channels; `networks.light_config`); 0: the shared encoder's
            own architecture. On the held-out cardiac folds at k = 3 and 5 the light network (16
            channels) served 0.71 / 0.76 at 150 s against 0.72 / 0.80: cheaper steps did not buy Dice.
        fresh_first: for structures the encoder never saw (the app's `refine_unseen`): at every number of
            labels, refine from freshly drawn weights (`fresh_adapter`) alone instead of the meta-learned
            ones or two starts, with neither the quick head as teacher nor the agreement check, judged on
            the held-out blocks alone (`start_refinement`). On a structure the encoder knows it sinks what
            is served.
        lead: with two starts, the share of the seconds that goes to the run whose best held-out Dice
            leads at equal compute (`TwoStartRefinement.share`), once both have been validated (0.5:
            equal shares whoever leads). Against equal
            shares on 4 cardiac structures at k = 3 (3 draws): the same mean served Dice at 150 s.
        ema: decay of an exponential moving average of the network's weights (encoder and head) that
            the guard validates and that is published instead of the weights of the last step
            (0: the last step's weights); the decay is shorter over the first steps. Against the last
            step's weights on 4 cardiac structures at k = 3 (3 draws, side by side): 0.639 / 0.689 /
            0.700 / 0.725 served at 10 / 30 / 60 / 150 s against 0.644 / 0.680 / 0.693 / 0.713.
    """

    lr_encoder: float = 1e-3
    lr_head: float = 3e-3
    batch: int = 4
    augment: float = 0.5
    val_every: int = 15
    patience: int = 8
    min_gain: float = 0.005
    budget_seconds: float = 600.0
    min_agreement: float = 0.5
    distill: float = 1.0
    distill_batch: int = 4
    bf16: bool = True
    fresh: int = 2
    fresh_emb: int = 0
    fresh_first: bool = False
    lead: float = 0.75
    ema: float = 0.97

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, text: str) -> RefineConfig:
        """'lr_encoder=3e-4,distill=0' -> the defaults with those fields set (an unknown field is an error)."""
        fields = {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                known = ", ".join(cls.__dataclass_fields__)
                raise ValueError(f"refinement setting {item!r}: expected key=value with a key among {known}")
            fields[key] = type(getattr(cls, key))(float(value))
        return cls(**fields)


def agreement_needed(head_dice: float, share: float) -> float:
    """The mean Dice a candidate must reach against the quick head's predictions on other studies: a
    candidate as right as the head agrees with it about as well as the truth does (the head's Dice on
    the held-out slices), so the bar is `share` of that."""
    return share * max(0.0, head_dice)


def study_split(masks: list[torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """(training slices, held-out slices) per study. Every study holding the structure holds out a
    block: the middle third of its slices that hold it (at least one); its other slices train. With
    none, nothing is held out (the guard cannot check).

    Args:
        masks: (S, size, size) binary masks of the structure, one per labelled study.
    """
    train = [list(range(m.shape[0])) for m in masks]
    val: list[list[int]] = [[] for _ in masks]
    for j in (j for j, m in enumerate(masks) if bool(m.any())):
        rows = [i for i in range(masks[j].shape[0]) if bool(masks[j][i].any())]
        n = max(1, len(rows) // 3)
        start = (len(rows) - n) // 2
        val[j] = rows[start : start + n]
        train[j] = [i for i in train[j] if i not in val[j]]
    return train, val


def pooled_dice(probs: list[torch.Tensor], masks: list[torch.Tensor]) -> float:
    """Dice of thresholded probabilities over all held-out slices together (1.0 when both are empty)."""
    inter = total = 0.0
    for p, m in zip(probs, masks):
        pred, ref = p >= 0.5, m.bool()
        inter += float((pred & ref).sum())
        total += float(pred.sum() + ref.sum())
    return 1.0 if total == 0 else 2 * inter / total


class Refinement:
    """End-to-end fine-tuning of one structure's network, stepped from outside (a background thread
    in the app, a timed loop in the evaluation), with validation, plateau and the guard.

    Args:
        adapter: the live adapter (meta-learned encoder); it is copied, never changed.
        stacks: (S, size, size) image stacks of the structure's labelled studies.
        masks: (S, size, size) binary masks of the structure, one per stack.
        head: the live quick head (warm start of the head's parameters).
        cfg: settings.
        seed: seed of slice sampling and augmentation.
        guard: False trains on every slice and never validates (the unguarded `finetune` baseline).
        state: a `state_dict()` of an earlier run to continue from (same structure; the labels may
            have grown since).
        floor: the held-out Dice a candidate must beat besides the quick head's (e.g. the live refined
            version's score on the current held-out slices).
        anchors: (S, size, size) image stacks of other studies, labelled or not: a candidate must agree
            with the quick head on them (None: no such check).
        judged_like: another run of the same structure and labels whose guard this one shares (the
            quick head's held-out score and its predictions on the anchors), instead of its own.
        start_from: (adapter, head) whose network this run trains when it is not the live one (a fresh
            start, `fresh_adapter`); the live `adapter` and `head` still judge it and teach it.
        feats: embeddings of each whole stack under `adapter`'s encoder, as the app caches them from
            inference (half precision is fine: each slice is used in float32; None: the guard embeds
            the stacks).
        anchor_feats: the same for each anchor study (None: the quick head's predictions on the anchors
            embed them).
    """

    start = "warm"  # where its network started: the meta-learned weights (see `TwoStartRefinement`)

    def __init__(
        self,
        adapter: SegAdapter,
        stacks: list[torch.Tensor],
        masks: list[torch.Tensor],
        head: Head,
        cfg: RefineConfig | None = None,
        seed: int = 0,
        guard: bool = True,
        state: dict | None = None,
        floor: float | None = None,
        anchors: list[torch.Tensor] | None = None,
        judged_like: Refinement | None = None,
        feats: list[torch.Tensor] | None = None,
        anchor_feats: list[torch.Tensor] | None = None,
        start_from: tuple[SegAdapter, Head] | None = None,
    ):
        self.cfg = cfg or RefineConfig()
        if start_from is not None:
            self.start = "fresh"
        trained, trained_head = start_from or (adapter, head)
        self.device = adapter.device
        self.context = adapter.model.cfg.context
        self.stacks, self.masks = stacks, [m.bool() for m in masks]
        self.guard = guard
        if guard:
            self.train_idx, self.val_idx = study_split(self.masks)
        else:
            self.train_idx, self.val_idx = [list(range(m.shape[0])) for m in self.masks], [[] for _ in self.masks]
        self.share = largest_component_share(self.masks)
        self.model = copy.deepcopy(trained.model).to(self.device)
        self.model.encoder.net.train()
        self.params = {
            k: v.detach().clone().to(self.device).requires_grad_(True)
            for k, v in trained_head.params.items()
            if k != COMPONENT_KEY
        }
        distilling = self.cfg.distill > 0 and sum(bool(m.any()) for m in self.masks) == 1
        self.opt = torch.optim.Adam(
            [
                {"params": list(self.model.encoder.net.parameters()), "lr": self.cfg.lr_encoder},
                {"params": list(self.params.values()), "lr": self.cfg.lr_head},
            ]
        )
        self.rng = random.Random(seed)
        self.steps = 0
        self.seconds = 0.0  # compute spent on this run (steps and validations)
        self.since_best = 0
        self.history: list[tuple[float, float]] = []  # (seconds, held-out Dice) of each validation
        fg = [(j, i) for j, m in enumerate(self.masks) for i in self.train_idx[j] if bool(m[i].any())]
        self.pool_fg = fg or [(j, i) for j in range(len(stacks)) for i in self.train_idx[j]]
        self.pool_all = [(j, i) for j in range(len(stacks)) for i in self.train_idx[j]]
        if judged_like is not None:
            self.baseline, self.anchors, self.teacher = judged_like.baseline, judged_like.anchors, []
        else:
            self.baseline = self._head_baseline(adapter, feats) if self.checkable else None
            checking = self.checkable and self.cfg.min_agreement > 0
            needed = anchors if anchors and (checking or distilling) else []  # predicted once, for both
            cached = anchor_feats or [None] * len(needed)
            teacher = [(st, adapter.predict(st, [head], feats=f)[0]) for st, f in zip(needed, cached)]
            self.anchors = [(st, p >= 0.5) for st, p in teacher] if checking else []
            self.teacher = teacher if distilling else []
        self.pool_teacher = [(j, i) for j, (_, p) in enumerate(self.teacher) for i in range(p.shape[0])]
        self.agreement: float | None = None  # of the last validation's candidate, when it was checked
        self.best = max(x for x in (self.baseline, floor, -1.0) if x is not None)
        if state is not None:
            self._load(state)
        self._start_average(state)

    # -- training -----------------------------------------------------------------------------
    @property
    def checkable(self) -> bool:
        """Whether any held-out slice exists (a guarded run that cannot check never publishes)."""
        return self.guard and any(self.val_idx)

    def step(self) -> float:
        """One optimiser step on a batch of training slices (3 in 4 holding the structure)."""
        t0 = time.perf_counter()
        pick = [self._draw() for _ in range(self.cfg.batch)]
        x = torch.cat([with_context(self.stacks[j], [i], self.context) for j, i in pick]).to(self.device)
        y = torch.stack([self.masks[j][i].float() for j, i in pick]).to(self.device)
        x, y = augment(x, y, self.rng, self.cfg.augment)
        loss = seg_loss(self.model.head.logits(self._embed(x), self.params), y)
        if self.teacher:
            loss = loss + self.cfg.distill * self._distill_loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps += 1
        self._average()
        self.seconds += time.perf_counter() - t0
        return float(loss.detach())

    def _start_average(self, state: dict | None) -> None:
        """The network the guard judges and publishes: a moving average of the trained one
        (`RefineConfig.ema`), or the trained one itself."""
        self.avg_model, self.avg_params = self.model, self.params
        if self.cfg.ema > 0:
            self.avg_model = copy.deepcopy(self.model).eval()
            self.avg_params = {k: v.detach().clone() for k, v in self.params.items()}
            saved = (state or {}).get("average")
            if saved:
                self.avg_model.encoder.net.load_state_dict(saved["encoder"])
                self._copy_head(self.avg_params, saved["head"])
        self.adapter = SegAdapter(self.avg_model, self.device, steps=0)  # the candidate's, as `head()` is

    @torch.no_grad()
    def _average(self) -> None:
        """Move the average towards the weights of this step (a shorter memory over the first steps)."""
        if self.avg_model is self.model:
            return
        w = 1.0 - min(self.cfg.ema, (1 + self.steps) / (10 + self.steps))
        for a, p in zip(self.avg_model.encoder.net.parameters(), self.model.encoder.net.parameters()):
            a.lerp_(p.detach(), w)
        for k, v in self.params.items():
            self.avg_params[k].lerp_(v.detach(), w)

    def _distill_loss(self) -> torch.Tensor:
        """Cross-entropy between the candidate's and the quick head's foreground probabilities on a
        batch of anchor slices, both seen through the same augmentation."""
        pick = [self.pool_teacher[self.rng.randrange(len(self.pool_teacher))] for _ in range(self.cfg.distill_batch)]
        x = torch.cat([with_context(self.teacher[j][0], [i], self.context) for j, i in pick]).to(self.device)
        p = torch.stack([self.teacher[j][1][i] for j, i in pick]).to(self.device)
        x, p = augment(x, p, self.rng, self.cfg.augment)
        logits = self.model.head.logits(self._embed(x), self.params)
        return F.binary_cross_entropy_with_logits(logits, p)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's forward pass of a training step, in bfloat16 where native (`RefineConfig.bf16`);
        the head and the loss run in float32 on its output, channels-last as `PrototypeHead.logits`
        wants them (its matmul then needs no copy: 1.15x the steps per second on one CPU core)."""
        with training_autocast(self.device, self.cfg.bf16):
            feats = self.model.embed(x)
        return feats.to(torch.float32, memory_format=torch.channels_last)

    def _draw(self) -> tuple[int, int]:
        pool = self.pool_fg if self.rng.random() < 0.75 else self.pool_all
        return pool[self.rng.randrange(len(pool))]

    # -- validation and the guard ---------------------------------------------------------------
    @torch.no_grad()
    def score(self, adapter: SegAdapter, head: Head, feats: list[torch.Tensor] | None = None) -> float:
        """Dice of (adapter, head) on the held-out slices of all studies together (`feats`: the whole
        stacks' embeddings under `adapter`, when they are at hand)."""
        probs, refs = [], []
        for j, (stack, mask, idx) in enumerate(zip(self.stacks, self.masks, self.val_idx)):
            if idx:
                f = feats[j][idx].to(adapter.device) if feats is not None else adapter.embed(stack, idx)
                probs.append(adapter.predict(stack, [head], feats=f)[0])
                refs.append(mask[idx])
        return pooled_dice(probs, refs)

    def _head_baseline(self, adapter: SegAdapter, feats: list[torch.Tensor] | None) -> float:
        """The quick head's recipe on the same training slices, scored on the held-out ones. Slices are
        embedded within their whole study, so that each sees its true neighbours (`context`)."""
        feats = feats if feats is not None else [adapter.embed(st) for st in self.stacks]
        keep = [j for j, idx in enumerate(self.train_idx) if idx and bool(self.masks[j][idx].any())]
        stacks = [self.stacks[j][self.train_idx[j]] for j in keep]
        train_feats = [feats[j][self.train_idx[j]] for j in keep]
        head = adapter.adapt(stacks, [self.masks[j][self.train_idx[j]] for j in keep], feats=train_feats)
        return self.score(adapter, head, feats)

    def head(self) -> Head:
        """The candidate's head parameters as a `Head` (with the support's component share)."""
        params = {k: v.detach().clone() for k, v in self.avg_params.items()}
        params[COMPONENT_KEY] = torch.tensor(self.share)
        return Head(params=params, n_labels=len(self.stacks), seconds=self.seconds)

    def validate(self) -> tuple[float, bool]:
        """(held-out Dice now, whether it is a candidate to publish: a new best by `min_gain`)."""
        t0 = time.perf_counter()
        self.model.encoder.net.eval()
        d = self.score(self.adapter, self.head())
        better = d >= self.best + self.cfg.min_gain
        self.history.append((self.seconds + time.perf_counter() - t0, d))
        self.agreement = None
        if better and self.anchors:
            self.agreement = self._agreement()
            better = self.agreement >= agreement_needed(self.baseline, self.cfg.min_agreement)
        self.model.encoder.net.train()
        self.seconds += time.perf_counter() - t0
        if better:
            self.best, self.since_best = d, 0
        else:
            self.since_best += 1
        return d, better

    @torch.no_grad()
    def _agreement(self) -> float:
        """Mean Dice between the candidate's and the quick head's predictions on the anchor studies."""
        head = self.head()
        scores = [pooled_dice([self.adapter.predict(st, [head])[0]], [ref]) for st, ref in self.anchors]
        return sum(scores) / len(scores)

    @property
    def top(self) -> float:
        """This run's own best held-out Dice so far (-1: not validated yet)."""
        return max((d for _, d in self.history), default=-1.0)

    def top_by(self, seconds: float) -> float:
        """Best held-out Dice of the validations made within its first `seconds` of compute (its first
        validation's when none was; -1 before any)."""
        if not self.history:
            return -1.0
        return max((d for t, d in self.history if t <= seconds), default=self.history[0][1])

    @property
    def plateau(self) -> bool:
        return self.since_best >= self.cfg.patience

    @property
    def spent(self) -> bool:
        return self.seconds >= self.cfg.budget_seconds

    def advance(self) -> tuple[float, bool] | None:
        """One step, then a validation every `val_every` steps: (held-out Dice, publish?) or None."""
        self.step()
        if self.checkable and self.steps % self.cfg.val_every == 0:
            return self.validate()
        return None

    # -- the result and its state ---------------------------------------------------------------
    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The candidate's encoder weights (posterior mean only: all inference needs)."""
        return {k: v.detach().cpu().clone() for k, v in self.avg_model.encoder.net.state_dict().items()}

    def state_dict(self) -> dict:
        """Everything to continue this run after a restart (plain tensors and numbers)."""
        state = {
            "encoder": {k: v.detach().cpu().clone() for k, v in self.model.encoder.net.state_dict().items()},
            "head": {k: v.detach().cpu().clone() for k, v in self.params.items()},
            "optimizer": self.opt.state_dict(),
            "steps": self.steps,
            "seconds": self.seconds,
            "start": self.start,
        }
        if self.avg_model is not self.model:
            head = {k: v.detach().cpu().clone() for k, v in self.avg_params.items()}
            encoder = {k: v.detach().cpu().clone() for k, v in self.avg_model.encoder.net.state_dict().items()}
            state["average"] = {"encoder": encoder, "head": head}
        return state

    @torch.no_grad()
    def _copy_head(self, params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
        """Copy saved head parameters in place (a parameter of another shape keeps its value)."""
        for k, v in saved.items():
            if k in params and params[k].shape == v.shape:
                params[k].copy_(v.to(self.device))

    def _load(self, state: dict) -> None:
        self.model.encoder.net.load_state_dict(state["encoder"])
        self._copy_head(self.params, state["head"])
        lrs = [g["lr"] for g in self.opt.param_groups]  # this run's rates, not those the state was saved with
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError):  # an optimiser of another layout: start its moments afresh
            pass
        for g, lr in zip(self.opt.param_groups, lrs):
            g["lr"] = lr
        self.steps = int(state.get("steps", 0))


def refined_adapter(base: SegAdapter, encoder: dict[str, torch.Tensor]) -> SegAdapter:
    """An adapter whose encoder carries a refined structure's weights (the base one is not changed).
    A version from a fresh start may be of the light network (`RefineConfig.fresh_emb`): its
    embedding width, read from the weights, rebuilds it."""
    if set(encoder) == set(base.model.encoder.net.state_dict()):
        model = copy.deepcopy(base.model)
    else:
        model = _light_model(base, _light_emb(encoder))
    model.encoder.net.load_state_dict(encoder)
    return SegAdapter(model.eval(), base.device, steps=0, chunk=base.chunk, max_slices=base.max_slices)


def _light_emb(encoder: dict[str, torch.Tensor]) -> int:
    """The embedding width of light-network weights: the length of the last layer's bias."""
    biases = [v for k, v in encoder.items() if k.endswith("bias")]
    if not biases:
        raise ValueError("refined encoder weights hold no bias: not a segmentation encoder")
    return int(biases[-1].shape[0])


def _light_model(base: SegAdapter, emb: int) -> FewShotSegModel:
    """A light network (`networks.light_config`) with the base model's learned inner-loop rates and head
    init, each per-channel one spread as its mean over channels when the width differs."""
    model = FewShotSegModel(light_config(base.model.cfg, emb)).to(base.device)
    with torch.no_grad():
        for own, theirs, skip in ((model.log_lr, base.model.log_lr, ()), (model.head, base.model.head, ("fg", "bg"))):
            mine = dict(own.named_parameters())
            for k, v in theirs.named_parameters():
                if k in mine and k not in skip:  # the head's prototypes come from each support
                    mine[k].copy_(v if v.shape == mine[k].shape else v.mean().expand_as(mine[k]))
    return model.eval()


def fresh_adapter(base: SegAdapter, seed: int, emb: int = 0) -> SegAdapter:
    """An adapter whose encoder has freshly drawn weights (MONAI's default init, seeded; the global random
    state is left as it was): of the base one's architecture, or with `emb` > 0 of the light network."""
    with torch.random.fork_rng(devices=[]):  # refined_adapter builds the light network again: inside too
        torch.manual_seed(seed)
        model = _light_model(base, emb) if emb else type(base.model)(base.model.cfg)
        return refined_adapter(base, model.encoder.net.state_dict())


class TwoStartRefinement:
    """Two refinements of one structure that take turns and share one guard: one starts from the
    meta-learned encoder and the live head (`warm`), the other from freshly drawn weights of the same
    network (`fresh`), with a head adapted on those weights.

    The meta-learned weights are the better start for a structure like those meta-training saw; for
    one it never saw they can be the worse one: on cardiac MRI with the encoder meta-trained without
    the RV blood pool, fine-tuning on one labelled study from them reached a mean Dice of 0.46-0.57 on
    other studies after 10-150 s, from fresh weights 0.61-0.71. Both kinds of candidate are the
    same network (an encoder and a head), so a version from either is served, versioned and rolled back
    alike. One guard judges both: a candidate from either run must beat the best one so far on the same
    held-out slices and agree with the quick head on the anchors as `Refinement` asks. The fresh run is
    not distilled towards the quick head, which would tie it to the head it is there to outgrow. The app
    runs two starts from two labelled studies on (`start_refinement`).

    The warm run trains alone until its first validation, so that the first refined version can go live
    as soon as one run alone would publish it; the fresh run is built then (a head adapted on freshly
    drawn weights costs as much as the quick head). The seconds then follow the guard's ranking: equal
    shares until both runs have been validated, then
    `RefineConfig.lead` of them to the run whose best held-out Dice leads at equal compute, so the start
    that learns faster is the one that trains most (on cardiac MRI at k = 3 the meta-learned start kept
    them on the LV blood pool, a fresh start took them on the RV). A run at its plateau gives its turns
    to the other. Same arguments as `Refinement` (`state` may also be a single run's state: it
    continues the warm run).
    """

    def __init__(
        self,
        adapter: SegAdapter,
        stacks: list[torch.Tensor],
        masks: list[torch.Tensor],
        head: Head,
        cfg: RefineConfig | None = None,
        seed: int = 0,
        state: dict | None = None,
        floor: float | None = None,
        anchors: list[torch.Tensor] | None = None,
        feats: list[torch.Tensor] | None = None,
        anchor_feats: list[torch.Tensor] | None = None,
    ):
        state = state or {}
        single = state if "encoder" in state else {}  # one run's state: it continues the run of its start
        warm_state = state.get("warm", single if single and single.get("start", "warm") == "warm" else None)
        fresh_state = state.get("fresh", single if single and single.get("start") == "fresh" else None)
        self.warm = Refinement(
            adapter,
            stacks,
            masks,
            head,
            cfg,
            seed=seed,
            state=warm_state,
            floor=floor,
            anchors=anchors,
            feats=feats,
            anchor_feats=anchor_feats,
        )
        self._adapter, self._seed = adapter, seed
        self.fresh: Refinement | None = None  # built at the warm run's first validation (or from a state)
        if fresh_state:
            self.start_fresh(fresh_state)
        self.last = self.warm  # the run of the latest step: whose candidate `head` and `encoder_state` give

    def start_fresh(self, state: dict | None = None) -> None:
        """Build the fresh run now (`advance` builds it at the warm run's first validation). A state of
        another fresh network (`fresh_emb` changed since it was saved) is dropped: the run starts afresh."""
        fresh = fresh_adapter(self._adapter, self._seed, self.warm.cfg.fresh_emb)
        cfg = RefineConfig(**{**self.warm.cfg.to_dict(), "distill": 0.0})
        head = fresh.adapt(self.warm.stacks, self.warm.masks)
        shapes = {k: v.shape for k, v in fresh.model.encoder.net.state_dict().items()}
        if state is not None and {k: v.shape for k, v in state["encoder"].items()} != shapes:
            state = None
        self.fresh = Refinement(  # one guard: the quick head's held-out score and anchors judge both
            fresh, self.warm.stacks, self.warm.masks, head, cfg, self._seed, state=state, judged_like=self.warm
        )
        self.fresh.start = "fresh"
        self.fresh.best = self.warm.best

    @property
    def runs(self) -> dict[str, Refinement]:
        """The runs started so far: the warm one, and the fresh one from the warm one's first validation."""
        return {"warm": self.warm} if self.fresh is None else {"warm": self.warm, "fresh": self.fresh}

    @property
    def best(self) -> float:
        return max(r.best for r in self.runs.values())

    @best.setter
    def best(self, value: float) -> None:
        for r in self.runs.values():
            r.best = value

    @property
    def start(self) -> str:
        """Where the latest step's network started from: "warm" or "fresh"."""
        return "warm" if self.last is self.warm else "fresh"

    def share(self, run: Refinement) -> float:
        """The share of the seconds `run` is due: `lead` when it leads the other run at equal compute, the
        rest when it trails, half before both have been validated or on a tie. At equal compute: the
        run that has had fewer seconds is judged by its best held-out Dice so far, the other by its best
        within as many seconds. Judged by their best so far alone, the warm run leads from its first
        validation and keeps the lead on the seconds it gives: on the held-out RV blood pool at three
        labels a fresh version was served at 150 s on 1 draw of 3, at equal compute on all 3 (0.73
        against 0.67 served)."""
        if self.fresh is None:
            return 1.0 if run is self.warm else 0.0
        other = self.fresh if run is self.warm else self.warm
        if min(run.top, other.top) < 0:
            return 0.5
        seconds = min(run.seconds, other.seconds)  # the run behind in seconds counts all it has validated
        mine, theirs = run.top_by(seconds), other.top_by(seconds)
        if mine == theirs:
            return 0.5
        return self.cfg.lead if mine > theirs else 1.0 - self.cfg.lead

    def advance(self) -> tuple[float, bool] | None:
        """One step of the run furthest behind its share of the seconds (of the one not at its
        plateau; the warm one alone until its first validation), then its validation every `val_every`
        of its steps: (held-out Dice, publish?) or None."""
        if self.fresh is None and self.warm.history:
            self.start_fresh()
        if self.fresh is None:
            self.last = self.warm
        else:
            order = sorted(self.runs.values(), key=lambda r: (r.plateau, r.seconds / max(self.share(r), 1e-6)))
            self.last = order[0]
        result = self.last.advance()
        if result is not None and result[1]:
            self.best = result[0]
        return result

    def head(self) -> Head:
        return self.last.head()

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return self.last.encoder_state()

    def score(self, adapter: SegAdapter, head: Head) -> float:
        return self.warm.score(adapter, head)

    def state_dict(self) -> dict:
        fresh = None if self.fresh is None else self.fresh.state_dict()
        return {"warm": self.warm.state_dict(), "fresh": fresh, "steps": self.steps}

    @property
    def baseline(self) -> float | None:
        return self.warm.baseline

    @property
    def stacks(self) -> list[torch.Tensor]:
        return self.warm.stacks

    @property
    def cfg(self) -> RefineConfig:
        return self.warm.cfg

    @property
    def agreement(self) -> float | None:
        return self.last.agreement

    @property
    def checkable(self) -> bool:
        return self.warm.checkable

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.runs.values())

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.runs.values())

    @property
    def plateau(self) -> bool:
        return self.fresh is not None and self.warm.plateau and self.fresh.plateau


def start_refinement(
    adapter: SegAdapter,
    stacks: list[torch.Tensor],
    masks: list[torch.Tensor],
    head: Head,
    cfg: RefineConfig,
    seed: int = 0,
    state: dict | None = None,
    anchors: list[torch.Tensor] | None = None,
    feats: list[torch.Tensor] | None = None,
    anchor_feats: list[torch.Tensor] | None = None,
) -> Refinement | TwoStartRefinement:
    """The guarded refinement the app runs: two starts once `RefineConfig.fresh` labelled studies hold
    the structure, else the warm one alone. With one label the guard's held-out block cannot tell a
    fresh candidate that fits that study from one that segments others: on cardiac MRI fresh versions
    that passed it took the RV blood pool, which the shipped model knows, from 0.64 to 0.32 on other
    studies, agreement check and all; hence two labels by default.

    With `RefineConfig.fresh_first` (a structure declared new to the encoder) one run trains fresh
    weights with all the seconds, no teacher and no agreement check, from the first label on: on the
    held-out cardiac folds the quick head as teacher pulled a fresh run on the RV blood pool from 0.70
    back to 0.45 on other studies at one label, and the agreement check refused every fresh candidate
    (agreement 0.17-0.20 with a head that scores 0.25 there, against a bar of 0.37); at three and five
    labels the fresh run alone served 0.87 at 150 s on the held-out LV and RV blood pools where two
    starts under the full guard served 0.77 (five labels).
    """
    labelled = sum(bool(m.any()) for m in masks)
    if cfg.fresh and labelled >= cfg.fresh and not cfg.fresh_first:
        return TwoStartRefinement(
            adapter, stacks, masks, head, cfg, seed, state, anchors=anchors, feats=feats, anchor_feats=anchor_feats
        )
    start = "fresh" if cfg.fresh_first else "warm"
    if state is not None and "warm" in state:  # a two-start run's state: continue its run of this start
        state = state[start] and {**state[start], "start": start}
    if state is not None and state.get("start", "warm") != start:
        state = None  # a run of the other start does not continue this one (the structure was declared anew)
    start_from = None
    if cfg.fresh_first:
        fresh = fresh_adapter(adapter, seed, cfg.fresh_emb)
        start_from = (fresh, fresh.adapt(stacks, masks))
        cfg = replace(cfg, distill=0.0, min_agreement=0.0)
    return Refinement(
        adapter,
        stacks,
        masks,
        head,
        cfg,
        seed,
        state=state,
        anchors=anchors,
        feats=feats,
        anchor_feats=anchor_feats,
        start_from=start_from,
    )
