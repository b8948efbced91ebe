"""Few-shot classification model, the same design as segmentation: a meta-learned shared encoder
under a Gaussian posterior (`VariationalNet`), and small task-specific layers.

* encoder: four MONAI `Convolution` blocks (conv, instance norm, PReLU) with max-pooling; the
  embedding is the global average of every block's output, concatenated. A 2D image is one view;
  a 3D volume is three views, its central axial, coronal and sagittal slices, and a region of
  interest (box or mask) crops of up to three of its axial slices; the views' features are averaged.
* head (`ProtoLinearHead`): each block's features are centred on the support's mean and scaled to
  unit length (`block_norm`, SimpleShot's CL2N per block), so that every block weighs the same in
  the distances whatever its scale; then one linear layer per feature level (`head_views`: blocks
  1+2, and all blocks), each initialised from class prototypes (Proto-MAML: W_c = 2 p_c,
  b_c = -|p_c|^2, the nearest prototype in Euclidean distance) and adapted with Meta-SGD rates (one
  per feature for W, shared across classes, one for b); the
  prediction averages their class probabilities. Why: the last, coarsest block transfers worst to
  a modality meta-training never saw (chest X-rays, 5-shot AUC 0.82 from it alone against 0.92
  from blocks 1+2), the first blocks alone cannot tell the cardiac structures apart (0.76-0.77),
  and the average of the two heads beat either head alone on PneumoniaMNIST's val split
  (`benchmarks/cls_feature_blocks.py`, `benchmarks/results/fewshot_cls_val_choices.json`). Without
  the normalisation the deep blocks dominate: on chest X-rays their centred features are 3-6 times
  longer than the first blocks'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from monailabel_metaapp.core.cls_data import IMAGE_CROP
from monailabel_metaapp.core.inner_loop import inner_adapt
from monailabel_metaapp.core.variational import VariationalNet, param_key


@dataclass
class ClsModelConfig:
    """The classifier's design, saved with its weights.

    Args:
        size: every view is resized to size x size.
        image_crop: the central share of a whole image's slice the model sees.
        channels: the width of each encoder block.
        head_views: the blocks each linear head sees.
        block_norm: centre each block's features on the support mean and scale them to unit length.
        prior_sigma: the standard deviation of the Gaussian prior over the encoder's weights.
        init_log_sigma: the posterior's initial log standard deviation.
    """

    size: int = 32  # every view is resized to size x size
    # whole images (not regions) are seen through their central `image_crop`; kept with the weights
    # so that a model is always fed what it was meta-trained on
    image_crop: float = IMAGE_CROP
    # half the width of the first design: as good on PneumoniaMNIST's val split, 1.8x faster per image
    channels: tuple[int, ...] = (16, 32, 32, 32)
    head_views: tuple[tuple[int, ...], ...] = ((1, 2), (0, 1, 2, 3))  # blocks each linear head sees
    block_norm: bool = True  # centre each block's features on the support mean, scale to unit length
    prior_sigma: float = 0.1
    init_log_sigma: float = -7.0

    def __post_init__(self) -> None:
        n = len(self.channels)
        views = tuple(tuple(sorted(set(v))) for v in self.head_views)
        if not views or any(not v or v[0] < 0 or v[-1] >= n for v in views):
            raise ValueError(f"head_views {self.head_views} must be non-empty sets of blocks 0..{n - 1}")
        self.head_views = views
        if not 0.0 < self.image_crop <= 1.0:
            raise ValueError(f"image_crop must be in (0, 1] (1 keeps the whole image), got {self.image_crop}")

    def to_dict(self) -> dict:
        """The configuration as JSON-ready values (the weights' sidecar)."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["head_views"] = [list(v) for v in self.head_views]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClsModelConfig:
        """The configuration a sidecar describes; fields it lacks take the values of older designs.

        Args:
            d: the sidecar's "config" (unknown keys are ignored).
        """
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        if "head_views" in d:
            d["head_views"] = tuple(tuple(v) for v in d["head_views"])
        d.setdefault("block_norm", False)  # written before the option: trained without it
        d.setdefault("image_crop", 1.0)  # written before the crop: whole images seen uncropped
        return cls(**d)

    @classmethod
    def from_channels(cls, text: str) -> ClsModelConfig:
        """The default design with the widths of a command-line list such as "16,32,32,32".

        Args:
            text: comma-separated block widths.
        """
        try:
            channels = tuple(int(c) for c in text.split(","))
        except ValueError:
            raise ValueError(f"channels must be comma-separated integers such as 16,32,32,32, got {text!r}") from None
        return cls(channels=channels)  # checks that every head's blocks exist

    def block_slices(self) -> list[slice]:
        """Each block's features in the embedding."""
        starts = [sum(self.channels[:b]) for b in range(len(self.channels) + 1)]
        return [slice(a, b) for a, b in zip(starts, starts[1:])]

    def view_dims(self) -> list[list[int]]:
        """For each head view, the positions of its blocks' features in the embedding."""
        starts = [sum(self.channels[:b]) for b in range(len(self.channels))]
        return [[i for b in v for i in range(starts[b], starts[b] + self.channels[b])] for v in self.head_views]


class PooledBlocks(nn.Sequential):
    """Conv blocks (conv, norm, PReLU, max-pool) -> the concatenated global averages of every block's
    output. A Sequential, so parameter names read `net.{2i}.conv...`.

    Args:
        channels: the width of each block.
    """

    def __init__(self, channels: tuple[int, ...]):
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            layers += [Convolution(2, c_in, c, kernel_size=3, act="PRELU", norm="INSTANCE"), nn.MaxPool2d(2)]
            c_in = c
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) images -> (N, sum(channels)) pooled features.

        Args:
            x: the images.
        """
        pooled = []
        for b in range(len(self) // 2):
            x = self[2 * b + 1](self[2 * b](x))
            pooled.append(x.mean((2, 3)))
        return torch.cat(pooled, 1)


class ProtoLinearHead(nn.Module):
    """Task-specific layers: one prototype-initialised linear layer per view (`W{i}`, `b{i}`), their
    softmax averaged. `logits` returns the log of that average, so softmax and cross-entropy
    apply to it as to any logits. With `blocks`, features are first centred on the support mean
    `mu` (kept in the parameters, fixed in the inner loop: it has no learned rate) and each block is
    scaled to unit length.

    Args:
        view_dims: for each linear layer, the positions of the features it sees.
        blocks: each block's slice of the features, to normalise per block (None: no normalisation).
    """

    def __init__(self, view_dims: list[list[int]], blocks: list[slice] | None = None):
        super().__init__()
        self.view_dims, self.blocks = view_dims, blocks

    def normalise(self, feats: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The features the linear layers see (unchanged without `blocks`).

        Args:
            feats: (N, D) features.
            params: the head's parameters (`mu`, the support mean, is used).
        """
        if not self.blocks:
            return feats
        z = feats - params["mu"]
        return torch.cat([F.normalize(z[:, b], dim=1) for b in self.blocks], 1)

    def init_params(self, feats: torch.Tensor, labels: torch.Tensor, n_way: int) -> dict[str, torch.Tensor]:
        """Proto-MAML initialisation from the support: W_c = 2 p_c, b_c = -|p_c|^2 per linear layer.

        Args:
            feats: (N, D) support features.
            labels: (N,) class indices 0..n_way-1.
            n_way: the number of classes.
        """
        params = {"mu": feats.mean(0)} if self.blocks else {}
        z = self.normalise(feats, params)
        for i, dims in enumerate(self.view_dims):
            protos = torch.stack([z[labels == c][:, dims].mean(0) for c in range(n_way)])
            params[f"W{i}"], params[f"b{i}"] = 2 * protos, -(protos**2).sum(1)
        return params

    def logits(self, feats: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, D) features -> (N, C) logits: the log of the linear layers' averaged probabilities.

        Args:
            feats: the features.
            params: the head's parameters.
        """
        return self.linear_logits(self.normalise(feats, params), params)

    def linear_logits(self, z: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """`logits` on features already normalised (the inner loop normalises the support once).

        Args:
            z: normalised features (`normalise`).
            params: the head's parameters.
        """
        probs = [
            F.softmax(z[:, dims] @ params[f"W{i}"].T + params[f"b{i}"], 1) for i, dims in enumerate(self.view_dims)
        ]
        return torch.log(torch.stack(probs).mean(0).clamp_min(1e-12))

    def matches(self, params: dict[str, torch.Tensor]) -> bool:
        """Whether stored head parameters fit this head (they may come from another model).

        Args:
            params: a stored head's parameters.
        """
        want = {f"{p}{i}": len(d) for i, d in enumerate(self.view_dims) for p in "Wb"}
        if self.blocks:
            want["mu"] = self.blocks[-1].stop
        return (
            set(params) == set(want)
            and all(params[f"W{i}"].shape[1] == want[f"W{i}"] for i in range(len(self.view_dims)))
            and ("mu" not in want or params["mu"].shape == (want["mu"],))
        )


class FewShotClsModel(nn.Module):
    """The few-shot classifier: a variational encoder, the prototype-linear head and its Meta-SGD rates.

    Args:
        cfg: its design (default: `ClsModelConfig()`).
    """

    def __init__(self, cfg: ClsModelConfig | None = None):
        super().__init__()
        self.cfg = cfg or ClsModelConfig()
        net = PooledBlocks(self.cfg.channels)
        self.encoder = VariationalNet(net, self.cfg.prior_sigma, self.cfg.init_log_sigma)
        self.head = ProtoLinearHead(self.cfg.view_dims(), self.cfg.block_slices() if self.cfg.block_norm else None)
        rates = {}  # log learning rates: per feature for W (shared across classes), one for b
        for i, dims in enumerate(self.head.view_dims):
            rates[f"W{i}"], rates[f"b{i}"] = torch.full((1, len(dims)), -3.0), torch.full((1,), -3.0)
        self.log_lr = nn.ParameterDict({param_key(k): nn.Parameter(v) for k, v in rates.items()})

    def lrs(self) -> dict[str, torch.Tensor]:
        """The learned inner-loop learning rate of each head parameter (W: per feature, b: one)."""
        return {k: torch.exp(v) for k, v in self.log_lr.items()}

    def embed(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """(N, V, size, size) views in [0, 1] -> (N, D) features (mean over views).

        Args:
            x: the views of N examples.
            sample: use one sample of the encoder's weights (meta-training) instead of their mean.
        """
        n, v = x.shape[:2]
        f = self.encoder(x.reshape(n * v, 1, *x.shape[2:]), sample=sample)
        return f.reshape(n, v, -1).mean(1)


@torch.no_grad()
def embed_examples(model: FewShotClsModel, views: list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Examples (each (V, size, size), V may differ) -> (N, D) features on `device`, batched by view count.

    Args:
        model: the classifier.
        views: one tensor of views per example.
        device: where to compute.
    """
    out: list[torch.Tensor | None] = [None] * len(views)
    for nv in sorted({v.shape[0] for v in views}):
        idx = [i for i, v in enumerate(views) if v.shape[0] == nv]
        f = model.embed(torch.stack([views[i] for i in idx]).to(device))
        for j, i in enumerate(idx):
            out[i] = f[j]
    return torch.stack(out)  # type: ignore[arg-type]


DEFAULT_CLS_STEPS = 20  # inner-loop steps of a classifier head's adaptation, in the app and its evaluation


def adapt(
    model: FewShotClsModel,
    feats: torch.Tensor,
    labels: torch.Tensor,
    n_way: int,
    steps: int,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """Prototype init + Meta-SGD steps of the head on support features (the encoder is untouched).

    Args:
        model: the classifier.
        feats: (N, D) support features.
        labels: (N,) class indices 0..n_way-1.
        n_way: the number of classes.
        steps: inner-loop steps.
        create_graph: keep the graph (meta-training differentiates through the steps).

    Returns:
        The adapted head parameters.
    """
    head = model.head
    params = head.init_params(feats, labels, n_way)
    if not create_graph:
        params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    # the support mean has no learned rate, so the normalised support is the same at every step
    z = head.normalise(feats, params)
    z = z if create_graph else z.detach()
    linear = SimpleNamespace(logits=head.linear_logits)
    with torch.enable_grad():
        return inner_adapt(linear, params, model.lrs(), z, labels, steps, create_graph, loss_fn=F.cross_entropy)
