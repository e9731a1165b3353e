"""Data: folder datasets of images and masks of several tasks, splits, augmentation, captions, synthetic data."""

from shared_model.data.captions import attribute_caption, class_prompt, describe_components
from shared_model.data.dataset import PolypDataset, evaluation_dataset
from shared_model.data.folder import (
    IMAGE_EXTENSIONS,
    DataError,
    Sample,
    list_samples,
    load_image,
    load_mask,
)
from shared_model.data.scene_dataset import SceneDataset, write_scenes
from shared_model.data.scenes import Scene, synthetic_scene
from shared_model.data.sources import list_config_samples
from shared_model.data.splits import (
    build_datasets,
    build_splits,
    load_split_file,
    save_split_file,
    split_samples,
)
from shared_model.data.synthetic import SyntheticStyle, centre_style, generate_dataset, synthetic_sample
from shared_model.data.tasks import TASKS, Task, get_task
from shared_model.data.transforms import JointTransform, item_seed

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "JointTransform",
    "PolypDataset",
    "Sample",
    "Scene",
    "SceneDataset",
    "SyntheticStyle",
    "TASKS",
    "Task",
    "attribute_caption",
    "build_datasets",
    "build_splits",
    "centre_style",
    "class_prompt",
    "describe_components",
    "evaluation_dataset",
    "generate_dataset",
    "get_task",
    "item_seed",
    "list_config_samples",
    "list_samples",
    "load_image",
    "load_mask",
    "load_split_file",
    "save_split_file",
    "split_samples",
    "synthetic_sample",
    "synthetic_scene",
    "write_scenes",
]
