"""ImageNet subsets used by GLaD/LD3M/MTT: ten ImageNet class indices each, in label order.

The tables are copied from `glad/utils.py::Config` (MTT's lists agree); the label of a class
is its position in the tuple, NOT its rank among the ten indices.

Mapping indices to folders: the 1000 ImageNet wnids are not shipped offline, so an ImageNet
root is read as `train/<wnid>/` and the ImageNet class index of a wnid is its position in the
sorted list of the 1000 wnid folders. This is exactly the standard ILSVRC-2012 index order
(torchvision's `ImageFolder` on ImageNet gives the same indices). A root that holds only some
wnid folders must carry a `wnids.txt` (1000 lines, one wnid per line, in class-index order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from ld3m.errors import DataError

NUM_IMAGENET_CLASSES = 1000

IMAGENETTE: tuple[int, ...] = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)
IMAGEWOOF: tuple[int, ...] = (193, 182, 258, 162, 155, 167, 159, 273, 207, 229)
CATS: tuple[int, ...] = (281, 282, 283, 284, 285, 291, 292, 290, 289, 287)  # ImageMeow
BIRDS: tuple[int, ...] = (84, 130, 88, 144, 145, 22, 96, 9, 100, 89)  # ImageSquawk
FRUITS: tuple[int, ...] = (953, 954, 949, 950, 951, 957, 952, 945, 943, 948)  # ImageFruit
YELLOW: tuple[int, ...] = (309, 986, 954, 951, 987, 779, 599, 291, 72, 11)  # ImageYellow (MTT)
IMNET_A: tuple[int, ...] = (255, 376, 984, 364, 500, 986, 333, 576, 148, 135)
IMNET_B: tuple[int, ...] = (129, 916, 90, 275, 995, 874, 102, 259, 685, 139)
IMNET_C: tuple[int, ...] = (565, 94, 554, 535, 92, 392, 291, 136, 324, 11)
IMNET_D: tuple[int, ...] = (9, 258, 13, 262, 19, 339, 321, 24, 93, 322)
IMNET_E: tuple[int, ...] = (816, 96, 100, 145, 739, 713, 783, 76, 688, 326)

IMAGENETTE_WNIDS: tuple[str, ...] = (
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888257",
)
"""Imagenette's wnid folders, sorted; they are ImageNet classes `IMAGENETTE` in this order."""

SUBSETS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        "imagenette": IMAGENETTE,
        "imagewoof": IMAGEWOOF,
        "cats": CATS,
        "birds": BIRDS,
        "fruits": FRUITS,
        "yellow": YELLOW,
        "a": IMNET_A,
        "b": IMNET_B,
        "c": IMNET_C,
        "d": IMNET_D,
        "e": IMNET_E,
    }
)
"""Subset name (as in `data.name=imagenet-<name>`) -> ImageNet class indices in label order."""


def subset_classes(subset: str) -> tuple[int, ...]:
    """Return the ImageNet class indices (label order) of a named subset."""
    if subset not in SUBSETS:
        valid = ", ".join(f"imagenet-{s}" for s in SUBSETS)
        raise DataError(f"unknown ImageNet subset 'imagenet-{subset}'; valid names: {valid}")
    return SUBSETS[subset]


def wnid_order(train_folders: Sequence[str], wnids_text: str | None, where: str) -> tuple[str, ...]:
    """Return the 1000 ImageNet wnids in class-index order, from `wnids.txt` or sorted folders."""
    if wnids_text is not None:
        wnids = tuple(line.strip() for line in wnids_text.splitlines() if line.strip())
        if len(wnids) != NUM_IMAGENET_CLASSES or len(set(wnids)) != NUM_IMAGENET_CLASSES:
            raise DataError(
                f"{where}/wnids.txt has {len(wnids)} lines ({len(set(wnids))} distinct); need 1000 "
                "distinct wnids in ImageNet class-index order; fix the file or remove it"
            )
        return wnids
    if len(train_folders) != NUM_IMAGENET_CLASSES:
        raise DataError(
            f"{where}/train has {len(train_folders)} class folders; an ImageNet subset needs the "
            "full ImageNet train/ layout (1000 wnid folders) or a wnids.txt (1000 wnids in "
            "class-index order) next to train/"
        )
    return tuple(sorted(train_folders))


def subset_wnids(subset: str, order: Sequence[str]) -> tuple[str, ...]:
    """Return the wnid folders of a subset in label order, given the 1000 wnids in index order."""
    return tuple(order[i] for i in subset_classes(subset))
