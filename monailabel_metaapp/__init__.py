"""monailabel_metaapp: a MONAI Label app with meta-learned few-shot segmentation."""

from pathlib import Path

__version__ = "0.1.0"
APP_DIR = Path(__file__).resolve().parent
