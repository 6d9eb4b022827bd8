"""Datasets of degraded/clean pairs: synthetic from clean images, or real from folders.

>>> from loraxir.data import SyntheticPairs
>>> train, test = SyntheticPairs.splits("skimage", suite="three_task", patch_size=64)
>>> item = train[0]   # {"lq", "gt", "task", "task_name", "label", "name"}

See ``docs/degradations.md`` for the item format and how to plug in BSD68, Rain100L, SOTS,
GoPro and LOL.
"""

from loraxir.data.dead_leaves import DeadLeavesSource, dead_leaves_image
from loraxir.data.images import IMAGE_EXTENSIONS, read_image, scan_folder, to_rgb8
from loraxir.data.paired import PairedFolder
from loraxir.data.sampling import TaskBalancedSampler, split_by_image, task_labels
from loraxir.data.sources import SKIMAGE_IMAGES, ImageSource, open_source, skimage_image
from loraxir.data.synthetic import SyntheticPairs

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIMAGE_IMAGES",
    "DeadLeavesSource",
    "ImageSource",
    "PairedFolder",
    "SyntheticPairs",
    "TaskBalancedSampler",
    "dead_leaves_image",
    "open_source",
    "read_image",
    "scan_folder",
    "skimage_image",
    "split_by_image",
    "task_labels",
    "to_rgb8",
]
