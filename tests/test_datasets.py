"""Real-data layer: folder/tar listing, decode + resize/crop, cache, mnist5k, ImageNet subsets."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ld3m.config.schema import DataConfig
from ld3m.data import subsets, tree
from ld3m.data.datasets import (
    CIFAR10_CLASSES,
    IMAGENET_MEAN,
    DatasetInfo,
    RealDataset,
    list_tree,
    load_dataset,
)
from ld3m.errors import DataError

CLASSES = ("ant", "bee", "cat")
CIFAR_TAR = Path("/work/shared/data/cifar10.tar")


def colour(label: int, i: int) -> tuple[int, int, int]:
    """A distinct solid colour per (class, image)."""
    return (40 + 60 * label, 10 + 20 * i, 200 - 50 * label)


def make_tree(
    root: Path, classes: tuple[str, ...] = CLASSES, n: int = 4, split: str = "test",
    size: tuple[int, int] = (40, 30), mode: str = "RGB",
) -> Path:  # fmt: skip
    """Write train/<class>/ and <split>/<class>/ with n solid-colour PNGs per class."""
    for s, count in (("train", n), (split, 2)):
        for label, c in enumerate(classes):
            (root / s / c).mkdir(parents=True)
            for i in range(count):
                fill = colour(label, i) if mode == "RGB" else colour(label, i)[0]
                Image.new(mode, size, fill).save(root / s / c / f"{i:03d}.png")
    return root


def make_tar(src: Path, tar_path: Path, arcname: str) -> Path:
    """Pack `src` into an uncompressed tar under the top folder `arcname`."""
    with tarfile.open(tar_path, "w") as tf:
        tf.add(src, arcname=arcname)
    return tar_path


def cfg(tmp_path: Path, **kw: object) -> DataConfig:
    """A DataConfig caching under tmp_path."""
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)  # type: ignore[arg-type]


def test_folder_resize_crop_labels_and_stats(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data")
    ds = load_dataset(cfg(tmp_path, name="imagefolder", root=str(root), res=16))
    assert ds.train_images.shape == (12, 3, 16, 16) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (6, 3, 16, 16)
    assert ds.info.class_names == CLASSES and ds.info.num_classes == 3 and ds.info.res == 16
    assert ds.info.prior_classes is None and ds.class_counts() == (4, 4, 4)
    for k in range(12):  # solid colours survive resize+crop, and each lands under its label
        label, i = int(ds.train_labels[k]), k % 4
        want = torch.tensor(colour(label, i), dtype=torch.uint8).view(3, 1, 1)
        assert torch.equal(ds.train_images[k], want.expand(3, 16, 16))
    x = ds.train_images.double() / 255
    assert np.allclose(ds.info.mean, x.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    assert np.allclose(ds.info.std, x.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-6)


def test_centre_crop_keeps_the_middle(tmp_path: Path) -> None:
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    img.paste((0, 255, 0), (10, 0, 20, 10))  # green middle third
    for split in ("train", "val"):
        (tmp_path / "d" / split / "x").mkdir(parents=True)
        img.save(tmp_path / "d" / split / "x" / "a.png")
    ds = load_dataset(cfg(tmp_path, name="imagefolder", root=str(tmp_path / "d"), res=10))
    assert torch.equal(ds.train_images[0, 1], torch.full((10, 10), 255, dtype=torch.uint8))
    assert int(ds.train_images[0, 0].max()) == 0
    assert ds.test_images.shape == (1, 3, 10, 10)


def test_tar_with_wrapping_folder_equals_directory(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data")
    tar = make_tar(root, tmp_path / "data.tar", "mydata")
    a = load_dataset(cfg(tmp_path, name="imagefolder", root=str(root), res=12))
    b = load_dataset(cfg(tmp_path, name="imagefolder", root=str(tar), res=12))
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    tree = list_tree(tar)
    assert tree.is_tar and tree.test_split == "test" and tuple(tree.train) == CLASSES
    wrapped = tmp_path / "wrap"
    wrapped.mkdir()
    root.rename(wrapped / "inner")  # a directory root with one wrapping folder
    c = load_dataset(cfg(tmp_path, name="imagefolder", root=str(wrapped), res=12))
    assert torch.equal(a.train_images, c.train_images)


def test_native_res_square_and_non_square(tmp_path: Path) -> None:
    square = make_tree(tmp_path / "sq", size=(8, 8))
    assert load_dataset(cfg(tmp_path, name="imagefolder", root=str(square))).info.res == 8
    wide = make_tree(tmp_path / "wide")
    with pytest.raises(DataError, match=r"not square; set data\.res"):
        load_dataset(cfg(tmp_path, name="imagefolder", root=str(wide)))


def test_grayscale_imagefolder_is_one_channel(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "g", size=(6, 6), mode="L")
    ds = load_dataset(cfg(tmp_path, name="imagefolder", root=str(root)))
    assert ds.info.channels == 1 and ds.train_images.shape == (12, 1, 6, 6)
    Image.new("RGB", (6, 6), (1, 2, 3)).save(root / "train" / "bee" / "zz.png")
    with pytest.raises(DataError, match=r"mismatched channel count.*zz\.png"):
        load_dataset(cfg(tmp_path, name="imagefolder", root=str(root)))


def test_cache_hit_skips_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "data")
    c = cfg(tmp_path, name="imagefolder", root=str(root), res=8)
    first = load_dataset(c)
    files = list((tmp_path / "cache").iterdir())
    assert [f.suffix for f in files] == [".safetensors"]  # no temp file left behind

    def boom(*args: object) -> None:
        raise AssertionError("decoded despite a cache hit")

    monkeypatch.setattr(tree, "decode_chunk", boom)
    second = load_dataset(c)
    assert torch.equal(first.train_images, second.train_images)
    assert second.info == first.info
    with pytest.raises(AssertionError, match="decoded"):  # another res is another cache entry
        load_dataset(cfg(tmp_path, name="imagefolder", root=str(root), res=9))


def test_corrupt_cache_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_tree(tmp_path / "data")
    c = cfg(tmp_path, name="imagefolder", root=str(root), res=8)
    first = load_dataset(c)
    (cache,) = (tmp_path / "cache").iterdir()
    cache.write_bytes(b"\x10\x00\x00\x00garbage")
    with caplog.at_level(logging.WARNING, logger="ld3m.data.datasets"):
        again = load_dataset(c)
    assert "ignoring unreadable dataset cache" in caplog.text
    assert torch.equal(first.train_images, again.train_images)
    assert cache.stat().st_size > 100  # rewritten


def test_mnist5k_split_and_determinism(tmp_path: Path) -> None:
    a = load_dataset(cfg(tmp_path))
    assert a.info.name == "mnist5k" and a.info.channels == 1 and a.info.res == 28
    assert a.train_images.shape == (4000, 1, 28, 28) and a.test_images.shape == (1000, 1, 28, 28)
    assert a.class_counts() == (400,) * 10
    assert torch.bincount(a.test_labels).tolist() == [100] * 10
    b = load_dataset(DataConfig(cache_dir=str(tmp_path / "other")))  # fresh decode
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    x = a.train_images.double() / 255
    assert abs(a.info.mean[0] - x.mean().item()) < 1e-6 and 0.1 < a.info.mean[0] < 0.2
    small = load_dataset(cfg(tmp_path, res=16))
    assert small.train_images.shape == (4000, 1, 16, 16)


def test_images_of_class_and_normalisation(tmp_path: Path) -> None:
    ds = load_dataset(cfg(tmp_path, name="imagefolder", root=str(make_tree(tmp_path / "d")), res=8))
    g = torch.Generator().manual_seed(0)
    out = ds.images_of_class(1, 3, generator=g)
    assert out.shape == (3, 3, 8, 8) and out.dtype == torch.float32
    own = ds.normalize(ds.train_images[ds.train_labels == 1])
    matches = [int((own == img).all(dim=(1, 2, 3)).nonzero()) for img in out]
    assert len(set(matches)) == 3  # distinct images, all of class 1
    again = ds.images_of_class(1, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    many = ds.images_of_class(2, 10)  # more than the 4 available: drawn with replacement
    other = ds.normalize(ds.train_images[ds.train_labels == 2])
    assert many.shape[0] == 10 and all((other == img).all(dim=(1, 2, 3)).any() for img in many)
    raw = ds.train_images[ds.train_labels == 1][matches]
    assert torch.allclose(ds.denormalize(out), raw / 255, atol=1e-6)
    assert torch.allclose(ds.denormalize(ds.normalize(ds.test_images)), ds.test_images / 255)
    x, y = ds.train_tensors()
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 1e-4 and y.dtype == torch.int64


def test_empty_class_names_the_class() -> None:
    info = DatasetInfo("t", 2, ("a", "b"), 1, 2, (0.5,), (0.5,), None)
    x = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(DataError, match="class 1 'b' has no training images"):
        RealDataset(x, torch.zeros(3, dtype=torch.int64), x, torch.zeros(3), info)


def make_fake_imagenet(root: Path, subset: str, wnids_txt: bool = True) -> tuple[str, ...]:
    """Write a wnids.txt of 1000 fake wnids and only the subset's folders (1 image each)."""
    wnids = tuple(f"n{i:08d}" for i in range(1000))
    root.mkdir(parents=True)
    if wnids_txt:
        (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    chosen = tuple(wnids[i] for i in subsets.SUBSETS[subset])
    for split in ("train", "val"):
        for label, w in enumerate(chosen):
            (root / split / w).mkdir(parents=True)
            Image.new("RGB", (10, 12), (label * 20, 0, 0)).save(root / split / w / "x.png")
    return chosen


def test_imagenet_subset_label_order(tmp_path: Path) -> None:
    chosen = make_fake_imagenet(tmp_path / "inet", "cats")
    ds = load_dataset(cfg(tmp_path, name="imagenet-cats", root=str(tmp_path / "inet"), res=8))
    assert ds.info.class_names == chosen and ds.info.prior_classes == subsets.CATS
    assert chosen[5] == "n00000291" and ds.info.mean == IMAGENET_MEAN
    reds = ds.train_images[:, 0, 0, 0].tolist()
    assert reds == [20 * int(y) for y in ds.train_labels] and ds.train_labels.tolist() == list(
        range(10)
    )


def test_imagenet_subset_needs_wnids_or_full_layout(tmp_path: Path) -> None:
    make_fake_imagenet(tmp_path / "inet", "a", wnids_txt=False)
    with pytest.raises(DataError, match=r"1000 wnid folders.*wnids\.txt"):
        load_dataset(cfg(tmp_path, name="imagenet-a", root=str(tmp_path / "inet"), res=8))
    make_fake_imagenet(tmp_path / "inet2", "b")
    with pytest.raises(DataError, match=r"train/n00000255 is missing"):
        load_dataset(cfg(tmp_path, name="imagenet-a", root=str(tmp_path / "inet2"), res=8))


def test_imagenette_folder_gets_imagenet_indices(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "nette", classes=subsets.IMAGENETTE_WNIDS, n=1, split="val")
    ds = load_dataset(cfg(tmp_path, name="imagenette", root=str(root), res=4))
    assert ds.info.prior_classes == (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)
    assert ds.info.mean == IMAGENET_MEAN
    with pytest.raises(DataError, match="not imagenette's"):
        load_dataset(cfg(tmp_path, name="imagenette", root=str(make_tree(tmp_path / "x"))))
    with pytest.raises(DataError, match="not cifar10's"):
        load_dataset(cfg(tmp_path, name="cifar10", root=str(tmp_path / "x"), res=4))


def test_error_messages(tmp_path: Path) -> None:
    def fails(match: str, **kw: object) -> None:
        with pytest.raises(DataError, match=match):
            load_dataset(cfg(tmp_path, **kw))

    fails(r"data\.root.*does not exist.*data\.name=mnist5k", name="cifar10", root="/no/such")
    fails(r"data\.root is empty.*data\.name=mnist5k", name="cifar10")
    fails(r"unknown dataset.*valid: mnist5k, cifar10", name="cifar100")
    (tmp_path / "empty").mkdir()
    fails("no train/ folder", name="imagefolder", root=str(tmp_path / "empty"))
    (tmp_path / "notest" / "train" / "a").mkdir(parents=True)
    fails("no val/ or test/", name="imagefolder", root=str(tmp_path / "notest"))
    root = make_tree(tmp_path / "d")
    (root / "train" / "dog").mkdir()
    fails("'dog' is in train/ but missing in test/", name="imagefolder", root=str(root), res=4)
    (root / "test" / "dog").mkdir()
    fails("'dog' has no images", name="imagefolder", root=str(root), res=4)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    fails(r"cannot read image .*broken\.jpg", name="imagefolder", root=str(root), res=4)
    gz = tmp_path / "d.tar"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(root, arcname="d")
    fails("not an uncompressed .tar", name="imagefolder", root=str(gz))


def test_real_cifar10_tar_is_recognised() -> None:
    if not CIFAR_TAR.is_file():
        pytest.skip(f"{CIFAR_TAR} not present (shared CIFAR-10 tar is optional)")
    tree = list_tree(CIFAR_TAR)
    assert tree.is_tar and tree.test_split == "test" and tuple(tree.train) == CIFAR10_CLASSES
    assert [len(v) for v in tree.train.values()] == [5000] * 10
    assert [len(v) for v in tree.test.values()] == [1000] * 10
    with CIFAR_TAR.open("rb") as fh:  # offsets point at real JPEG data
        fh.seek(tree.train["cat"][0].offset)
        assert fh.read(2) == b"\xff\xd8"
