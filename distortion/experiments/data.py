r"""Image datasets that yield model-ready tensors: ``.npz`` arrays, CIFAR-10/100, ImageFolder.

Every source is loaded as an :class:`ImageDataset`: labels, class names, a stable
``dataset_id`` (used in cache keys and provenance) and batches of preprocessed images.
Subsets (the first ``n``, ``per_class`` images of each class drawn with a seed, a subset of
classes with labels remapped to ``0..k-1``) are chosen at load time.

Sources
-------
``path/to/file.npz``
    ``images`` uint8 of shape (N, H, W, 3), ``labels`` integers of shape (N,), optional
    ``classes`` (strings) — the format of ``<shared>/data/cifar10/test.npz``.
``"cifar10"``, ``"cifar100"``, or a folder holding ``cifar-10-batches-py`` / ``cifar-100-python``
    The torchvision root layout (python-pickle batches), downloaded when ``download=True``
    and a network exists. ``"cifar10"`` without a root also finds
    ``<shared>/data/cifar10/test.npz``.
``"imagenet"`` or any other folder
    An ImageFolder tree (one sub-folder of images per class, sorted names = class indices),
    the layout of the ImageNet validation set; ImageNet preprocessing by default.

This module imports torch only inside the functions that build tensors.

References
----------
.. [1] A. Krizhevsky, "Learning multiple layers of features from tiny images", 2009.
.. [2] O. Russakovsky et al., "ImageNet large scale visual recognition challenge",
   IJCV 115, 2015.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from distortion.experiments import _paths

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR_PREPROCESSING",
    "IMAGENET_PREPROCESSING",
    "PREPROCESSINGS",
    "ImageDataset",
    "Preprocessing",
    "SubsetSpec",
    "get_preprocessing",
    "load_dataset",
    "make_image_folder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The CIFAR-10 class names, in label order.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "label_key": "labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "title": "CIFAR-10",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "label_key": "fine_labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "title": "CIFAR-100",
    },
}

_WHAT_TO_PASS = (
    "pass --data PATH (a .npz file, a torchvision CIFAR root or an ImageFolder tree), "
    "or set DISTORTION_DATA to the shared-data folder"
)


@dataclass(frozen=True)
class Preprocessing:
    r"""How uint8 RGB images become the model's float input.

    Parameters
    ----------
    name : str
        Short name, used in provenance and cache keys.
    mean, std : tuple of 3 floats
        Per-channel normalization applied after scaling pixels to [0, 1].
    resize : int or None
        Resize the shorter side to this many pixels (bilinear, antialiased) first.
    crop : int or None
        Then take the central ``crop x crop`` square.

    Notes
    -----
    .. math:: x_{c,i,j} = \frac{p_{c,i,j} / 255 - \mathrm{mean}_c}{\mathrm{std}_c}
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None
    crop: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serializable dict."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


#: CIFAR models of ``<shared>/models/cifar10-resnet``: pixels / 255, ImageNet mean and std.
CIFAR_PREPROCESSING = Preprocessing("cifar", IMAGENET_MEAN, IMAGENET_STD)
#: torchvision ImageNet evaluation: resize 256, center crop 224, normalize.
IMAGENET_PREPROCESSING = Preprocessing("imagenet", IMAGENET_MEAN, IMAGENET_STD, 256, 224)
PREPROCESSINGS: dict[str, Preprocessing] = {
    "cifar": CIFAR_PREPROCESSING,
    "imagenet": IMAGENET_PREPROCESSING,
}


def get_preprocessing(preprocessing: str | Preprocessing) -> Preprocessing:
    """Return a :class:`Preprocessing` given it or its name (``"cifar"``, ``"imagenet"``)."""
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    if preprocessing in PREPROCESSINGS:
        return PREPROCESSINGS[preprocessing]
    raise ValueError(
        f"preprocessing must be one of {sorted(PREPROCESSINGS)} or a Preprocessing, "
        f"got {preprocessing!r}"
    )


@dataclass(frozen=True)
class SubsetSpec:
    """Which part of a source was kept (None = no restriction)."""

    classes: tuple[str, ...] | None = None
    per_class: int | None = None
    n: int | None = None
    seed: int = 0

    def describe(self) -> str:
        """Return a short stable string such as ``classes=cat,dog;per_class=100;seed=0``."""
        parts = []
        if self.classes is not None:
            parts.append("classes=" + ",".join(self.classes))
        if self.per_class is not None:
            parts.append(f"per_class={self.per_class};seed={self.seed}")
        if self.n is not None:
            parts.append(f"n={self.n}")
        return ";".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serializable dict."""
        d = asdict(self)
        d["classes"] = None if self.classes is None else list(self.classes)
        return d


class ImageDataset:
    r"""Labelled RGB images with the preprocessing a model expects.

    Build one with :func:`load_dataset` or :meth:`from_arrays`. Items are
    ``(image, label)`` with ``image`` a float32 tensor of shape (3, H, W); :meth:`batches`
    yields whole batches with vectorized preprocessing (the fast path for extraction).
    It is also a map-style ``torch.utils.data.Dataset``.

    Attributes
    ----------
    labels : ndarray of shape (n_samples,), int64
        Class index in ``0..n_classes-1`` (remapped when a subset of classes was chosen).
    class_names : tuple of str, length n_classes
        Names of the kept classes, in label order.
    class_ids : tuple of int, length n_classes
        Index of each kept class in the source's numbering (``source_class_names``).
    source_class_names : tuple of str
        All class names of the source (the model's output classes).
    indices : ndarray of shape (n_samples,), int64
        Position of each image in the source.
    dataset_id : str
        Stable description, e.g. ``"npz:test.npz[classes=cat,dog]"``.
    preprocessing : Preprocessing
    subset : SubsetSpec
    """

    def __init__(
        self,
        *,
        labels: np.ndarray,
        class_names: Sequence[str],
        class_ids: Sequence[int],
        source_class_names: Sequence[str],
        indices: np.ndarray,
        base_id: str,
        preprocessing: Preprocessing,
        subset: SubsetSpec,
        images: np.ndarray | None = None,
        files: Sequence[Path] | None = None,
        source: str = "",
    ) -> None:
        if (images is None) == (files is None):
            raise ValueError("exactly one of images and files must be given")
        self.labels = _readonly(np.asarray(labels, dtype=np.int64))
        self.class_names = tuple(str(c) for c in class_names)
        self.class_ids = tuple(int(c) for c in class_ids)
        self.source_class_names = tuple(str(c) for c in source_class_names)
        self.indices = _readonly(np.asarray(indices, dtype=np.int64))
        self.preprocessing = preprocessing
        self.subset = subset
        self.source = source
        self.base_id = base_id
        self._images = None if images is None else _readonly(images)
        self._files = None if files is None else [Path(f) for f in files]
        n = len(self.labels)
        if len(self.indices) != n or (images is not None and len(images) != n):
            raise ValueError("labels, indices and images must have the same length")
        if files is not None and len(self._files) != n:
            raise ValueError("labels, indices and files must have the same length")

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        class_names: Sequence[str] | None = None,
        preprocessing: str | Preprocessing = "cifar",
        name: str = "arrays",
        n: int | None = None,
        per_class: int | None = None,
        classes: Sequence[str | int] | str | None = None,
        seed: int = 0,
    ) -> ImageDataset:
        """Build a dataset from in-memory arrays (validated like a ``.npz`` file).

        Parameters
        ----------
        images : ndarray of shape (n_samples, H, W, 3), uint8
        labels : ndarray of shape (n_samples,), integers in ``0..n_classes-1``
        class_names : sequence of str, optional
            Default: ``"0", "1", ...`` up to the largest label.
        name : str
            Base of ``dataset_id``.
        n, per_class, classes, seed
            Subset, as in :func:`load_dataset`.
        """
        images, labels, names = _validate_arrays(images, labels, class_names, where=name)
        return _build_array_dataset(
            images, labels, names, base_id=name, source=name,
            preprocessing=get_preprocessing(preprocessing),
            subset_args=(classes, per_class, n, seed),
        )  # fmt: skip

    # -- basic protocol ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        if self._images is not None:
            x = _preprocess_uint8(self._images[i : i + 1 if i != -1 else None], self.preprocessing)
            return x[0], int(self.labels[i])
        return _load_file(self._files[i], self.preprocessing), int(self.labels[i])

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.dataset_id!r}, n={len(self)}, n_classes={self.n_classes}, "
            f"preprocessing={self.preprocessing.name!r})"
        )

    @property
    def n_classes(self) -> int:
        """Number of kept classes."""
        return len(self.class_names)

    @property
    def dataset_id(self) -> str:
        """Stable description of the source and subset (no absolute paths)."""
        desc = self.subset.describe()
        return f"{self.base_id}[{desc}]" if desc else self.base_id

    @property
    def images(self) -> np.ndarray | None:
        """The uint8 images of shape (n_samples, H, W, 3), or None for a folder of files."""
        return self._images

    @property
    def files(self) -> list[Path] | None:
        """The image files (ImageFolder), or None for in-memory images."""
        return None if self._files is None else list(self._files)

    # -- iteration -----------------------------------------------------------------------
    def batches(
        self, batch_size: int = 256, *, num_workers: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)``: float32 tensors of shape (B, 3, H, W) and int64 labels (B,).

        In-memory images are preprocessed one whole batch at a time (no per-image Python
        work); image files are decoded one by one, in ``num_workers`` worker processes when
        positive.
        """
        import torch

        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        labels = torch.from_numpy(np.array(self.labels))
        if self._images is not None:
            for start in range(0, len(self), batch_size):
                stop = min(start + batch_size, len(self))
                yield (
                    _preprocess_uint8(self._images[start:stop], self.preprocessing),
                    labels[start:stop],
                )
            return
        if num_workers > 0:
            loader = torch.utils.data.DataLoader(
                self, batch_size=batch_size, shuffle=False, num_workers=num_workers
            )
            yield from loader
            return
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            xs = [_load_file(f, self.preprocessing) for f in self._files[start:stop]]
            yield _stack(xs, self._files[start:stop]), labels[start:stop]

    # -- identity ------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the kept images and labels (hex).

        In-memory images: their bytes and shape. Image files: each file's path relative to
        the tree, its size and modification time (reading every ImageNet file again on each
        cache lookup would cost more than it protects against).
        """
        h = hashlib.sha256()
        h.update(self.dataset_id.encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        h.update(repr(self.class_names).encode())
        if self._images is not None:
            h.update(repr(self._images.shape).encode())
            h.update(np.ascontiguousarray(self._images).tobytes())
        else:
            for f in self._files:
                st = f.stat()
                rel = f.relative_to(self.source) if f.is_relative_to(self.source) else f
                h.update(f"{rel.as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def to_frame(self) -> pd.DataFrame:
        """Return one row per kept class: name, source class id, number of images, prior."""
        counts = np.bincount(self.labels, minlength=self.n_classes)
        return pd.DataFrame(
            {
                "class": list(self.class_names),
                "class_id": list(self.class_ids),
                "n": counts,
                "prior": counts / max(len(self), 1),
            }
        )


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------
def load_dataset(
    source: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    split: Literal["test", "train"] = "test",
    preprocessing: str | Preprocessing = "auto",
    n: int | None = None,
    per_class: int | None = None,
    classes: Sequence[str | int] | str | None = None,
    seed: int = 0,
    download: bool = False,
) -> ImageDataset:
    r"""Load images and labels from a file, a folder or a named dataset.

    Parameters
    ----------
    source : str or path
        A ``.npz`` file; a folder (torchvision CIFAR root or ImageFolder tree); or one of
        ``"cifar10"``, ``"cifar100"``, ``"imagenet"``.
    root : str or path, optional
        For a named source: its folder (CIFAR: holds ``cifar-10-batches-py`` or
        ``test.npz``; ImageNet: the ImageFolder tree of the split). Default:
        ``<DISTORTION_DATA>/data/<name>`` (ImageNet: ``.../imagenet/val``).
    split : {"test", "train"}
        Which CIFAR split (ImageNet: ``"test"`` means the validation folder).
    preprocessing : {"auto", "cifar", "imagenet"} or Preprocessing
        ``"auto"``: ImageNet preprocessing for ImageFolder trees, CIFAR otherwise.
    n : int, optional
        Keep the first ``n`` images (after the other selections).
    per_class : int, optional
        Keep ``per_class`` images of each class, drawn without replacement with ``seed``,
        in their original order.
    classes : sequence of str or int, or a comma-separated str, optional
        Keep these classes (names or source indices), labels remapped to ``0..k-1`` in the
        order given.
    seed : int
        Seed of the ``per_class`` draw.
    download : bool
        Download CIFAR-10/100 when absent (needs a network).

    Returns
    -------
    ImageDataset

    Raises
    ------
    FileNotFoundError
        The source is missing; the message says what to pass.
    ValueError
        Malformed files or an impossible subset.
    """
    subset_args = (classes, per_class, n, seed)
    prep_auto = preprocessing == "auto"
    if isinstance(source, str) and source in ("cifar10", "cifar100"):
        prep = CIFAR_PREPROCESSING if prep_auto else get_preprocessing(preprocessing)
        return _load_named_cifar(source, root, split, prep, subset_args, download)
    if isinstance(source, str) and source == "imagenet":
        prep = IMAGENET_PREPROCESSING if prep_auto else get_preprocessing(preprocessing)
        folder = Path(root) if root is not None else None
        if folder is None:
            data = _paths.data_root()
            sub = "val" if split == "test" else "train"
            folder = None if data is None else data / "imagenet" / sub
        if folder is None or not folder.is_dir():
            raise FileNotFoundError(
                f"ImageNet folder {str(folder) if folder else '<DISTORTION_DATA>/data/imagenet'!r}"
                " not found and ImageNet cannot be downloaded automatically; pass --data PATH "
                "to the validation images in ImageFolder layout (one sub-folder per class)"
            )
        return _load_image_folder(folder, prep, subset_args, base_id="imagenet:" + split)

    path = Path(source).expanduser()
    if root is not None:
        raise ValueError(f"root is only used with a named source, got source={str(source)!r}")
    if not path.exists():
        raise FileNotFoundError(
            f"data source {str(source)!r} is not a file, a folder, or one of cifar10, cifar100,"
            f" imagenet; {_WHAT_TO_PASS}"
        )
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(
                f"data file {str(path)!r} is not a .npz file; pass a .npz with 'images' "
                "(N, H, W, 3) uint8 and 'labels' (N,), or a folder"
            )
        prep = CIFAR_PREPROCESSING if prep_auto else get_preprocessing(preprocessing)
        return _load_npz(path, prep, subset_args)
    for name, info in _CIFAR.items():
        if (path / info["folder"]).is_dir() or path.name == info["folder"]:
            prep = CIFAR_PREPROCESSING if prep_auto else get_preprocessing(preprocessing)
            root_dir = path.parent if path.name == info["folder"] else path
            return _load_cifar_pickles(name, root_dir, split, prep, subset_args)
    prep = IMAGENET_PREPROCESSING if prep_auto else get_preprocessing(preprocessing)
    return _load_image_folder(path, prep, subset_args, base_id=f"imagefolder:{path.name}")


def _load_npz(
    path: Path,
    prep: Preprocessing,
    subset_args: tuple,
    *,
    base_id: str | None = None,
    default_names: Sequence[str] | None = None,
) -> ImageDataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            images = z["images"] if "images" in keys else None
            labels = z["labels"] if "labels" in keys else None
            names = [str(c) for c in z["classes"]] if "classes" in keys else None
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError, object arrays
        raise ValueError(f"cannot read {str(path)!r} as a .npz file: {exc}") from exc
    missing = {"images", "labels"} - keys
    if missing:
        raise ValueError(
            f"{str(path)!r} lacks the key(s) {sorted(missing)} (found {sorted(keys)}); "
            "a data .npz needs 'images' (N, H, W, 3) uint8 and 'labels' (N,)"
        )
    if names is None and default_names is not None:
        names = list(default_names)
    images, labels, names = _validate_arrays(images, labels, names, where=str(path))
    return _build_array_dataset(
        images, labels, names, base_id=base_id or f"npz:{path.name}", source=str(path),
        preprocessing=prep, subset_args=subset_args,
    )  # fmt: skip


def _load_named_cifar(
    name: str,
    root: str | os.PathLike[str] | None,
    split: str,
    prep: Preprocessing,
    subset_args: tuple,
    download: bool,
) -> ImageDataset:
    info = _CIFAR[name]
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if root is not None:
        root_dir = Path(root).expanduser()
        if root_dir.is_file() and root_dir.suffix == ".npz":
            return _load_npz(root_dir, prep, subset_args)
    else:
        data = _paths.data_root()
        root_dir = (data if data is not None else _paths.cache_dir() / "data") / name
    if (root_dir / info["folder"]).is_dir():
        return _load_cifar_pickles(name, root_dir, split, prep, subset_args)
    npz = root_dir / f"{split}.npz"
    if npz.is_file():
        return _load_npz(
            npz, prep, subset_args, base_id=f"{name}:{split}",
            default_names=CIFAR10_CLASSES if name == "cifar10" else None,
        )  # fmt: skip
    if download:
        try:
            from torchvision.datasets.utils import download_and_extract_archive

            root_dir.mkdir(parents=True, exist_ok=True)
            download_and_extract_archive(
                info["url"], str(root_dir), filename=Path(info["url"]).name, md5=info["md5"]
            )
        except Exception as exc:  # no network, read-only folder, bad archive
            raise FileNotFoundError(
                f"could not download {info['title']} into {str(root_dir)!r} ({exc}); "
                f"{_WHAT_TO_PASS}"
            ) from exc
        return _load_cifar_pickles(name, root_dir, split, prep, subset_args)
    raise FileNotFoundError(
        f"{info['title']} not found: looked for {str(root_dir / info['folder'])!r} and "
        f"{str(npz)!r}; {_WHAT_TO_PASS}, or download it (--download, download=True)"
    )


def _load_cifar_pickles(
    name: str, root: Path, split: str, prep: Preprocessing, subset_args: tuple
) -> ImageDataset:
    info = _CIFAR[name]
    folder = root / info["folder"]
    images, labels = [], []
    for fname in info[split]:
        entry = _read_pickle(folder / fname)
        if "data" not in entry or info["label_key"] not in entry:
            raise ValueError(
                f"{str(folder / fname)!r} lacks 'data' or {info['label_key']!r} (found "
                f"{sorted(entry)}); is this a {info['title']} python batch?"
            )
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{str(folder / fname)!r}: 'data' must be uint8 of shape (N, 3072), got "
                f"{data.dtype} {data.shape}"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(entry[info["label_key"]]))
    meta_file, meta_key = info["meta"]
    meta = _read_pickle(folder / meta_file)
    if meta_key not in meta:
        raise ValueError(f"{str(folder / meta_file)!r} lacks {meta_key!r} (found {sorted(meta)})")
    names = [str(c) for c in meta[meta_key]]
    imgs, labs, names = _validate_arrays(
        np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), names,
        where=str(folder),
    )  # fmt: skip
    return _build_array_dataset(
        imgs, labs, names, base_id=f"{name}:{split}", source=str(root),
        preprocessing=prep, subset_args=subset_args,
    )  # fmt: skip


def _read_pickle(path: Path) -> dict[str, Any]:
    # The CIFAR python batches are pickles (as torchvision reads them): only open trusted files.
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing; {_WHAT_TO_PASS}")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:
        raise ValueError(f"cannot read {str(path)!r} as a CIFAR python batch: {exc}") from exc
    if not isinstance(entry, dict):
        raise ValueError(f"{str(path)!r} does not hold a dict; is it a CIFAR python batch?")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in entry.items()}


def _load_image_folder(
    folder: Path, prep: Preprocessing, subset_args: tuple, *, base_id: str
) -> ImageDataset:
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(
            f"folder {str(folder)!r} has no class sub-folders; an ImageFolder tree has one "
            "sub-folder of images per class (e.g. val/n01440764/*.JPEG)"
        )
    files: list[Path] = []
    labels: list[int] = []
    for k, d in enumerate(class_dirs):
        found = sorted(
            Path(dirpath) / f
            for dirpath, _, fnames in os.walk(d, followlinks=True)
            for f in fnames
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not found:
            raise ValueError(
                f"class folder {str(d)!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})"
            )
        files.extend(found)
        labels.extend([k] * len(found))
    names = [d.name for d in class_dirs]
    labels_arr = np.asarray(labels, dtype=np.int64)
    idx, new_labels, class_ids, kept_names, spec = _select(labels_arr, names, *subset_args)
    return ImageDataset(
        labels=new_labels, class_names=kept_names, class_ids=class_ids,
        source_class_names=names, indices=idx, base_id=base_id, preprocessing=prep,
        subset=spec, files=[files[i] for i in idx], source=str(folder),
    )  # fmt: skip


def make_image_folder(
    root: str | os.PathLike[str],
    class_names: Sequence[str] | int,
    *,
    per_class: int | Sequence[int] = 1,
    size: int = 8,
    fmt: Literal["png", "jpeg"] = "png",
    seed: int = 0,
) -> Path:
    """Write a synthetic ImageFolder tree: random RGB images, one sub-folder per class.

    For tests, benchmarks, and trying an ImageNet configuration without ImageNet; the
    layout is that of the validation set (``root/<class>/<image>``) that
    :func:`load_dataset` reads.

    Parameters
    ----------
    root : path
        The tree's folder (created; existing class folders are written into).
    class_names : sequence of str, or int
        Names of the class folders (sorted, they give the class indices), or their number
        (``n00000000``, ``n00000001``, ...: WordNet-id-like names).
    per_class : int or sequence of int
        Images in each class folder (one count for every class, or one per class).
    size : int
        Side of the square images, in pixels.
    fmt : {"png", "jpeg"}
        File format (PNG is lossless, JPEG the format of ImageNet).
    seed : int
        Seed of the pixels.

    Returns
    -------
    Path
        ``root``.
    """
    from PIL import Image

    names = [f"n{k:08d}" for k in range(class_names)] if isinstance(class_names, int) else [
        str(c) for c in class_names
    ]  # fmt: skip
    if not names or len(set(names)) != len(names):
        raise ValueError(f"class_names must be distinct and non-empty, got {len(names)} names")
    counts = [per_class] * len(names) if isinstance(per_class, int) else list(per_class)
    if len(counts) != len(names) or any(not isinstance(c, int) or c < 1 for c in counts):
        raise ValueError(
            f"per_class must be a positive integer or one per class ({len(names)}), got "
            f"{per_class!r}"
        )
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"fmt must be 'png' or 'jpeg', got {fmt!r}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    rng = np.random.default_rng(seed)
    out = Path(root).expanduser()
    ext = "JPEG" if fmt == "jpeg" else "png"
    for name, count in zip(names, counts, strict=True):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for j in range(count):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / f"{name}_{j:05d}.{ext}")
    return out


# ---------------------------------------------------------------------------------------
# validation and subsets
# ---------------------------------------------------------------------------------------
def _validate_arrays(
    images: Any, labels: Any, class_names: Sequence[str] | None, *, where: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8:
        raise ValueError(
            f"{where}: images must be uint8 RGB pixels of shape (N, H, W, 3), got dtype "
            f"{images.dtype}"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{where}: images must have shape (N, H, W, 3) (RGB, channels last), got {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{where}: labels must have shape ({len(images)},) to match the images, got "
            f"{labels.shape}"
        )
    if len(images) == 0:
        raise ValueError(f"{where}: there are no images")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    n_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"{where}: labels must lie in 0..{n_classes - 1} (the {n_classes} classes), got "
            f"values in {labels.min()}..{labels.max()}"
        )
    names = list(class_names) if class_names is not None else [str(k) for k in range(n_classes)]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: class names must be distinct, got {names}")
    return images, labels, names


def _build_array_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    *,
    base_id: str,
    source: str,
    preprocessing: Preprocessing,
    subset_args: tuple,
) -> ImageDataset:
    idx, new_labels, class_ids, kept_names, spec = _select(labels, names, *subset_args)
    kept = images if len(idx) == len(images) and np.all(idx == np.arange(len(images))) else None
    return ImageDataset(
        labels=new_labels, class_names=kept_names, class_ids=class_ids, source_class_names=names,
        indices=idx, base_id=base_id, preprocessing=preprocessing, subset=spec,
        images=kept if kept is not None else np.ascontiguousarray(images[idx]), source=source,
    )  # fmt: skip


def _resolve_classes(classes: Sequence[str | int] | str, names: Sequence[str]) -> list[int]:
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    ids: list[int] = []
    for c in classes:
        if isinstance(c, str) and c in names:
            ids.append(list(names).index(c))
        elif isinstance(c, int | np.integer) or (isinstance(c, str) and c.isdigit()):
            k = int(c)
            if not 0 <= k < len(names):
                raise ValueError(f"classes: index {k} out of range 0..{len(names) - 1}")
            ids.append(k)
        else:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise ValueError(f"classes: unknown class {c!r}; available: {shown}")
    if not ids:
        raise ValueError("classes must name at least one class, got an empty selection")
    if len(set(ids)) != len(ids):
        raise ValueError(f"classes must be distinct, got {list(classes)}")
    return ids


def _select(
    labels: np.ndarray,
    names: Sequence[str],
    classes: Sequence[str | int] | str | None,
    per_class: int | None,
    n: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, list[int], list[str], SubsetSpec]:
    """Indices kept, remapped labels, kept source class ids and names, and the spec."""
    idx = np.arange(len(labels))
    class_ids = list(range(len(names)))
    if classes is not None:
        class_ids = _resolve_classes(classes, names)
        idx = idx[np.isin(labels, class_ids)]
    if per_class is not None:
        if not isinstance(per_class, int | np.integer) or per_class < 1:
            raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
        rng = np.random.default_rng(seed)
        chosen = []
        for k in class_ids:
            members = idx[labels[idx] == k]
            if len(members) < per_class:
                raise ValueError(
                    f"per_class={per_class} but class {names[k]!r} has only {len(members)} "
                    "images; pass a smaller --per-class"
                )
            chosen.append(rng.choice(members, size=per_class, replace=False))
        idx = np.sort(np.concatenate(chosen))
    if n is not None:
        if not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if n > len(idx):
            raise ValueError(f"n={n} but only {len(idx)} images are available; pass a smaller n")
        idx = idx[:n]
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[class_ids] = np.arange(len(class_ids))
    spec = SubsetSpec(
        classes=None if classes is None else tuple(names[k] for k in class_ids),
        per_class=None if per_class is None else int(per_class),
        n=None if n is None else int(n),
        seed=int(seed),
    )
    return idx, remap[labels[idx]], class_ids, [names[k] for k in class_ids], spec


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# ---------------------------------------------------------------------------------------
# preprocessing (torch)
# ---------------------------------------------------------------------------------------
def _preprocess_uint8(images: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalized float32 (B, 3, H', W'), one vectorized pass."""
    import torch

    x = torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2)  # writable copy
    if prep.resize is not None or prep.crop is not None:
        from torchvision.transforms.v2 import functional as TF

        if prep.resize is not None:
            x = TF.resize(x, [prep.resize], antialias=True)
        if prep.crop is not None:
            x = TF.center_crop(x, [prep.crop])
    x = x.to(torch.float32).div_(255.0).contiguous()
    mean = torch.tensor(prep.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def _load_file(path: Path, prep: Preprocessing) -> torch.Tensor:
    """Decode one image file and preprocess it (PIL resize, as torchvision's presets)."""
    import torch
    from PIL import Image
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except Exception as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc
    if prep.resize is not None:
        img = TF.resize(img, [prep.resize], antialias=True)
    if prep.crop is not None:
        img = TF.center_crop(img, [prep.crop])
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.to(torch.float32).div_(255.0)
    mean = torch.tensor(prep.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def _stack(xs: list[torch.Tensor], files: Sequence[Path]) -> torch.Tensor:
    import torch

    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise ValueError(
            f"images of different sizes {sorted(shapes)} in one batch (e.g. {str(files[0])!r}); "
            "use a preprocessing with resize and crop (e.g. preprocessing='imagenet')"
        )
    return torch.stack(xs)
