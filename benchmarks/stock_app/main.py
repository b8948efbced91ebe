"""Stock MONAI Label baseline app: one 3D UNet "segmentation" model, fine-tuned the way stock MONAI Label does it.

It mirrors the radiology sample app (lib/configs|infers|trainers/segmentation.py) with a small UNet and the
cardiac labels, so that benchmarks/stock_flow.py can time what stock Slicer Auto-Update costs (save label ->
POST /train/segmentation -> training subprocess -> published weights -> infer). Random-init weights on purpose:
there is no pretrained model and start-up must not download anything.
"""

import os

import monailabel
import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapLabelValued,
    RandCropByPosNegLabeld,
    ScaleIntensityRangePercentilesd,
    SelectItemsd,
    Spacingd,
    SpatialPadd,
)
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.tasks.train.basic_train import BasicTrainTask, Context
from monailabel.transform.post import Restored

# Datastore label values (cmr_bssfp) -> channel index used by the network.
LABELS = {"lv myocardium": 1, "lv blood pool": 2, "rv blood pool": 3}
LABEL_VALUES = {"lv myocardium": 200, "lv blood pool": 500, "rv blood pool": 600}
# The CMR stacks are 1.25x1.25x8 mm short-axis slices stored in varying orientations (PSR, LSP, ...): the radiology
# app's Orientationd("RAS") would move the 8 mm slice axis around per study, so the pipeline stays in voxel order.
TARGET_SPACING = (1.5, 1.5, 8.0)
ROI_SIZE = (96, 96, 16)  # divisible by 2**3 for the three stride-2 levels


def make_network() -> torch.nn.Module:
    """Small MONAI UNet, random init: a CPU fine-tune epoch takes seconds and nothing is downloaded."""
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=len(LABELS) + 1,
        channels=(16, 32, 64, 128),
        strides=(2, 2, 2),
        num_res_units=2,
    )


class SpacingKeepPathd(Spacingd):
    """Spacingd that leaves MONAI Label's ``image_path`` string alone.

    MONAI 1.6's Spacingd updates every ``image_*`` key as a meta dict, so stock MONAI Label 0.8.5 inference (which
    puts the ``image_path`` string in the data) fails with "'str' object has no attribute 'update'".
    """

    def __call__(self, data, lazy=None):
        d = dict(data)
        path = d.pop("image_path", None)
        d = super().__call__(d, lazy=lazy)
        if path is not None:
            d["image_path"] = path
        return d


class SegmentationInfer(BasicInferTask):
    """Stock sliding-window inference, like the radiology sample's Segmentation infer task."""

    def __init__(self, path, network, labels, **kwargs):
        super().__init__(
            path=path,
            network=network,
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=3,
            description="Stock UNet for cardiac MR (baseline)",
            load_strict=False,
            roi_size=ROI_SIZE,
            **kwargs,
        )

    def pre_transforms(self, data=None):
        return [
            LoadImaged(keys="image"),
            EnsureTyped(keys="image", device=data.get("device") if data else None),
            EnsureChannelFirstd(keys="image"),
            SpacingKeepPathd(keys="image", pixdim=TARGET_SPACING),
            ScaleIntensityRangePercentilesd(keys="image", lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True),
        ]

    def inferer(self, data=None) -> Inferer:
        return SlidingWindowInferer(roi_size=ROI_SIZE, sw_batch_size=2, overlap=0.25, mode="gaussian")

    def inverse_transforms(self, data=None):
        return []

    def post_transforms(self, data=None):
        return [
            EnsureTyped(keys="pred", device=data.get("device") if data else None),
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys="pred", argmax=True),
            Restored(keys="pred", ref_image="image"),
        ]


class SegmentationTrain(BasicTrainTask):
    """Stock supervised fine-tune (BasicTrainTask), like the radiology sample's Segmentation trainer."""

    def __init__(self, model_dir, network, num_samples=4, **kwargs):
        self._network = network
        self.num_samples = num_samples
        super().__init__(model_dir, description="Train stock UNet (baseline)", **kwargs)

    def network(self, context: Context):
        return self._network

    def optimizer(self, context: Context):
        return torch.optim.AdamW(context.network.parameters(), lr=1e-4, weight_decay=1e-5)

    def loss_function(self, context: Context):
        return DiceCELoss(to_onehot_y=True, softmax=True)

    def lr_scheduler_handler(self, context: Context):
        return None

    def train_data_loader(self, context, num_workers=0, shuffle=False):
        return super().train_data_loader(context, num_workers, True)

    def _load(self, context: Context):
        return [
            LoadImaged(keys=("image", "label")),
            EnsureChannelFirstd(keys=("image", "label")),
            MapLabelValued(
                keys="label",
                orig_labels=[LABEL_VALUES[k] for k in LABELS],
                target_labels=list(LABELS.values()),
            ),
            EnsureTyped(keys=("image", "label"), device=context.device),
            Spacingd(keys=("image", "label"), pixdim=TARGET_SPACING, mode=("bilinear", "nearest")),
            ScaleIntensityRangePercentilesd(keys="image", lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True),
        ]

    def train_pre_transforms(self, context: Context):
        return self._load(context) + [
            SpatialPadd(keys=("image", "label"), spatial_size=ROI_SIZE),
            RandCropByPosNegLabeld(
                keys=("image", "label"),
                label_key="label",
                spatial_size=ROI_SIZE,
                pos=1,
                neg=1,
                num_samples=self.num_samples,
                image_key="image",
                image_threshold=0,
            ),
            SelectItemsd(keys=("image", "label")),
        ]

    def train_post_transforms(self, context: Context):
        return [
            EnsureTyped(keys="pred", device=context.device),
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=len(LABELS) + 1),
        ]

    def val_pre_transforms(self, context: Context):
        return self._load(context) + [SelectItemsd(keys=("image", "label"))]

    def val_inferer(self, context: Context):
        return SlidingWindowInferer(roi_size=ROI_SIZE, sw_batch_size=2, overlap=0.25, mode="gaussian")


class StockApp(MONAILabelApp):
    """Minimal stock app with the single "segmentation" model; weights live in <app>/model/."""

    def __init__(self, app_dir, studies, conf):
        self.model_dir = os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        self.network = make_network()
        self.published = os.path.join(self.model_dir, "segmentation.pt")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MONAILabel - stock baseline ({monailabel.__version__})",
            description="Stock MONAI Label UNet baseline for the latency benchmark",
            version=monailabel.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {"segmentation": SegmentationInfer(path=[self.published], network=self.network, labels=LABELS)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {
            "segmentation": SegmentationTrain(
                model_dir=os.path.join(self.model_dir, "segmentation"),
                network=self.network,
                load_path=self.published,
                publish_path=self.published,
                labels=LABELS,
            )
        }
