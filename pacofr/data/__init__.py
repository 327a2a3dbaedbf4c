"""Real faces, offline: reading photos, detection, alignment, facial-region maps, datasets.

Modules: ``image_io`` (safe decoding), ``decode`` (encoded crops to uint8 tensors at the training
size), ``detection`` (detector interface and registry; ``mtcnn`` registers itself there and needs
the ``faces`` extra to run), ``alignment`` (template and similarity warp), ``regions`` (patch
region ids), ``augment`` (per image) and ``batch_augment`` (the same for a batch on the training
device), ``loading`` (uint8 batches to the device, prefetched), ``rank_shards`` (each DDP rank
reads its own shards), ``prepare`` (the ``pacofr prepare`` pipeline), ``storage`` (prepared-folder
layout), ``datasets`` and ``demo`` (the packaged demo faces). Importing this package loads none of
the optional detector packages."""

from pacofr.data.alignment import TEMPLATE_224, AlignmentRecipe, align_face, similarity_transform
from pacofr.data.augment import Augment
from pacofr.data.batch_augment import BatchAugment
from pacofr.data.datasets import AlignedFaceDataset, RawFolderDataset, ShardFaceDataset
from pacofr.data.demo import demo_dataset, demo_root
from pacofr.data.detection import Detection, FaceDetector, MissingDependencyError, create_detector
from pacofr.data.mtcnn import MTCNNDetector  # registers "mtcnn"; OpenCV is imported only when one is built
from pacofr.data.regions import REGION_NAMES, landmark_region_ids, region_overlay, template_region_ids

__all__ = [
    "TEMPLATE_224", "AlignmentRecipe", "align_face", "similarity_transform",
    "Augment", "BatchAugment", "AlignedFaceDataset", "RawFolderDataset", "ShardFaceDataset", "demo_dataset", "demo_root",
    "Detection", "FaceDetector", "MissingDependencyError", "create_detector", "MTCNNDetector",
    "REGION_NAMES", "landmark_region_ids", "region_overlay", "template_region_ids",
]
