"""Few-shot classification model, the same design as segmentation: a meta-learned shared encoder
under a Gaussian posterior (`VariationalNet`), and a small task-specific head.

* encoder: four MONAI `Convolution` blocks (conv, instance norm, PReLU) with max-pooling, then
  global average pooling: one feature vector per view. A 2D image is one view; a 3D volume (or
  region of interest) is three views, its central axial, coronal and sagittal slices, whose
  features are averaged.
* head (`ProtoLinearHead`): a linear layer initialised from class prototypes (Proto-MAML:
  W_c = 2 p_c, b_c = -|p_c|^2, i.e. nearest prototype in Euclidean distance) and adapted with
  Meta-SGD per-parameter rates shared across classes (the number of classes varies per task).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from monailabel_metaapp.core.inner_loop import inner_adapt
from monailabel_metaapp.core.variational import VariationalNet, param_key


@dataclass
class ClsModelConfig:
    size: int = 32  # every view is resized to size x size
    channels: tuple[int, ...] = (32, 64, 64, 64)
    prior_sigma: float = 0.1
    init_log_sigma: float = -7.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClsModelConfig:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(**d)


def conv4(channels: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 1
    for c in channels:
        layers += [Convolution(2, c_in, c, kernel_size=3, act="PRELU", norm="INSTANCE"), nn.MaxPool2d(2)]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


class ProtoLinearHead(nn.Module):
    """Task-specific layers of classification; stateless apart from what `init_params` returns."""

    @staticmethod
    def init_params(feats: torch.Tensor, labels: torch.Tensor, n_way: int) -> dict[str, torch.Tensor]:
        protos = torch.stack([feats[labels == c].mean(0) for c in range(n_way)])
        return {"W": 2 * protos, "b": -(protos**2).sum(1)}

    @staticmethod
    def logits(feats: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return feats @ params["W"].T + params["b"]


class FewShotClsModel(nn.Module):
    def __init__(self, cfg: ClsModelConfig | None = None):
        super().__init__()
        self.cfg = cfg or ClsModelConfig()
        self.encoder = VariationalNet(conv4(self.cfg.channels), self.cfg.prior_sigma, self.cfg.init_log_sigma)
        self.head = ProtoLinearHead()
        d = self.cfg.channels[-1]
        rates = {"W": torch.full((1, d), -3.0), "b": torch.full((1,), -3.0)}  # log learning rates
        self.log_lr = nn.ParameterDict({param_key(k): nn.Parameter(v) for k, v in rates.items()})

    def lrs(self) -> dict[str, torch.Tensor]:
        return {k: torch.exp(v) for k, v in self.log_lr.items()}

    def embed(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """(N, V, size, size) views in [0, 1] -> (N, D) features (mean over views)."""
        n, v = x.shape[:2]
        f = self.encoder(x.reshape(n * v, 1, *x.shape[2:]), sample=sample)
        return f.reshape(n, v, -1).mean(1)


def adapt(
    model: FewShotClsModel,
    feats: torch.Tensor,
    labels: torch.Tensor,
    n_way: int,
    steps: int,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """Prototype init + Meta-SGD steps of the head on support features (the encoder is untouched)."""
    params = model.head.init_params(feats, labels, n_way)
    if not create_graph:
        params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        return inner_adapt(model.head, params, model.lrs(), feats, labels, steps, create_graph, loss_fn=F.cross_entropy)
