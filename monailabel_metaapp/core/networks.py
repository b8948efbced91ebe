"""The two halves of the model: a shared, meta-learned encoder and a small task-specific head.

* `VariationalEncoder` - MONAI's 2D BasicUNet producing a per-pixel embedding. Its weights are the
  mean of a mean-field Gaussian posterior q(theta; alpha) (alpha = per-weight log-sigma), so the
  meta-objective can carry the KL(q || p) term of the seed article.
* `PrototypeHead` - the task-specific layers adapted per structure: foreground/background
  prototypes initialised from the support (PANet/ALPNet style), a learned scale and bias, and a
  zero-initialised 3x3 conv residual. Few parameters, so adaptation takes seconds on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, UNet

from monailabel_metaapp.core.variational import VariationalNet, param_key


@dataclass
class SegModelConfig:
    """Architecture settings; saved next to the weights (JSON) so a checkpoint rebuilds itself."""

    size: int = 160  # in-plane side every slice is resized to
    context: int = 1  # neighbouring slices on each side fed as channels (0 = 2D, 1 = 2.5D)
    features: tuple[int, ...] = (16, 16, 32, 64, 128, 32)
    emb: int = 32  # embedding channels
    backbone: str = "basicunet"  # "basicunet" (features: 6 widths) or "unet" (MONAI UNet, stride-2 levels)
    n_fg: int = 2  # foreground prototypes
    n_bg: int = 8  # background prototypes
    prior_sigma: float = 0.1  # std of the Gaussian prior p(theta)
    init_log_sigma: float = -7.0  # initial log-std of q(theta; alpha)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SegModelConfig:
        d = dict(d)
        d["features"] = tuple(d.get("features", cls.features))
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class VariationalEncoder(VariationalNet):
    """The shared layers of segmentation: a 2D BasicUNet (2.5D input) under a Gaussian posterior.

    Args:
        cfg: the architecture (context slices, widths, embedding channels, prior and posterior scales).
    """

    def __init__(self, cfg: SegModelConfig):
        channels = 1 + 2 * cfg.context
        if cfg.backbone == "basicunet":
            net = BasicUNet(spatial_dims=2, in_channels=channels, out_channels=cfg.emb, features=cfg.features)
        elif cfg.backbone == "unet":
            strides = (2,) * (len(cfg.features) - 1)
            net = UNet(2, channels, cfg.emb, channels=cfg.features, strides=strides, num_res_units=1)
        else:
            raise ValueError(f"unknown backbone {cfg.backbone!r}: expected 'basicunet' or 'unet'")
        super().__init__(net, cfg.prior_sigma, cfg.init_log_sigma)


def light_config(cfg: SegModelConfig, emb: int) -> SegModelConfig:
    """A light network for a refinement from fresh weights (`RefineConfig.fresh_emb`): MONAI's UNet with
    the first convolution already at stride 2 (the scratch baseline's layout) and `emb` embedding
    channels, where the shared encoder's decoder runs two 32-channel convolutions at full resolution."""
    return replace(cfg, backbone="unet", features=(16, 32, 64, 128), emb=emb)


class PrototypeHead(nn.Module):
    """Task-specific layers. Its own parameters are the meta-learned *initialisation*; per task the
    prototypes come from the support, and everything is adapted by the inner loop (`logits`).

    Args:
        cfg: the architecture (embedding channels, foreground and background prototypes).
    """

    def __init__(self, cfg: SegModelConfig):
        super().__init__()
        c = cfg.emb
        self.n_fg, self.n_bg = cfg.n_fg, cfg.n_bg
        self.fg = nn.Parameter(torch.zeros(cfg.n_fg, c))  # placeholders, replaced per task
        self.bg = nn.Parameter(torch.zeros(cfg.n_bg, c))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(0.0))
        self.conv = nn.Conv2d(c, 1, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) embeddings -> (N, H, W) foreground logits, with the module's own parameters."""
        return self.logits(feats, dict(self.named_parameters()))

    def init_params(self, feats: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Meta-learned init for scale/bias/conv, prototypes from the support embeddings.

        Args:
            feats: (N, C, H, W) support embeddings.
            mask: (N, H, W) binary support mask.
        """
        params = dict(self.named_parameters())
        fg_feats = feats.permute(0, 2, 3, 1)[mask > 0.5]
        bg_feats = feats.permute(0, 2, 3, 1)[mask <= 0.5]
        params["fg"] = prototypes(fg_feats, self.n_fg, fallback=bg_feats)
        params["bg"] = prototypes(bg_feats, self.n_bg, fallback=fg_feats)
        return params

    @staticmethod
    def logits(feats: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head as a pure function of `params`: the inner loop differentiates through it, and the
        app's adaptation, inference and scoring threads call it at once (torch.func.functional_call
        would swap the shared module's parameters in place, which is not thread-safe)."""
        # cosine similarity to every prototype in one matmul over (N, H, W, C): a view without copies
        # when the features are channels-last, as the adapter passes them (4x faster per inner step)
        f = F.normalize(feats, dim=1).permute(0, 2, 3, 1)
        s = f @ F.normalize(torch.cat([params["fg"], params["bg"]]), dim=1).T
        n_fg = params["fg"].shape[0]
        t = 0.1  # soft-max over prototypes
        d = t * (torch.logsumexp(s[..., :n_fg] / t, -1) - torch.logsumexp(s[..., n_fg:] / t, -1))
        conv = F.conv2d(feats, params["conv.weight"], params["conv.bias"], padding=1)
        return torch.exp(params["log_scale"]) * d + params["bias"] + conv[:, 0]


def prototypes(x: torch.Tensor, k: int, fallback: torch.Tensor, iters: int = 5, max_points: int = 4096) -> torch.Tensor:
    """k cosine k-means centroids of (P, C) features (differentiable through the means).

    Args:
        x: the features of one class of pixels.
        k: centroids wanted (repeats pad the result when fewer are found).
        fallback: features to use when `x` is empty (e.g. the structure left the augmented view).
        iters: k-means iterations.
        max_points: at most this many features, evenly subsampled.
    """
    if x.shape[0] == 0:  # e.g. augmentation moved the structure out of view: keep the graph intact
        x = fallback.mean(0, keepdim=True)
    if x.shape[0] > max_points:
        idx = torch.linspace(0, x.shape[0] - 1, max_points, device=x.device).long()
        x = x[idx]
    xn = F.normalize(x, dim=1)
    with torch.no_grad():
        # farthest-point seeding from the mean: deterministic and spread out
        centres = [F.normalize(xn.mean(0), dim=0)]
        for _ in range(1, min(k, x.shape[0])):
            sim = torch.stack([xn @ c for c in centres], 1).max(1).values
            centres.append(xn[torch.argmin(sim)])
        c = torch.stack(centres)
        for _ in range(iters):
            assign = (xn @ c.T).argmax(1)
            c = torch.stack([xn[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(c.shape[0])])
            c = F.normalize(c, dim=1)
        assign = (xn @ c.T).argmax(1)
    protos = [x[assign == j].mean(0) for j in range(c.shape[0]) if (assign == j).any()]
    out = torch.stack(protos)
    if out.shape[0] < k:  # pad with repeats so the parameter shape is fixed
        out = out[torch.arange(k, device=out.device) % out.shape[0]]
    return out


class FewShotSegModel(nn.Module):
    """Encoder + head + the Meta-SGD per-parameter inner-loop learning rates (log-space).

    Args:
        cfg: the architecture (default: `SegModelConfig()`).
    """

    def __init__(self, cfg: SegModelConfig | None = None):
        super().__init__()
        self.cfg = cfg or SegModelConfig()
        self.encoder = VariationalEncoder(self.cfg)
        self.head = PrototypeHead(self.cfg)
        c = self.cfg.emb
        shapes = {
            "fg": (1, c),
            "bg": (1, c),
            "log_scale": (),
            "bias": (),
            "conv.weight": (1, c, 3, 3),
            "conv.bias": (1,),
        }
        init = {"fg": -1.0, "bg": -1.0, "log_scale": -2.0, "bias": -1.0, "conv.weight": -3.0, "conv.bias": -2.0}
        self.log_lr = nn.ParameterDict({param_key(k): nn.Parameter(torch.full(s, init[k])) for k, s in shapes.items()})

    def lrs(self) -> dict[str, torch.Tensor]:
        return {k.replace("__", "."): torch.exp(v) for k, v in self.log_lr.items()}

    def embed(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return self.encoder(x, sample=sample)
