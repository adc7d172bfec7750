"""Datasets available offline: scikit-learn digits, toy 2D densities, local image files.

Image datasets are returned as integer levels ``(N, C, H, W)`` in ``{0..K-1}`` (``uint8`` or
``int64``); dequantisation happens in the likelihood pipeline. Toy data are float points in R^2.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BadInput

if TYPE_CHECKING:
    import torch

DIGITS_LEVELS = 17
SPLIT_SEED = 0
TEST_FRACTION = 0.2
TOY_DENSITIES = ("moons", "8gaussians", "checkerboard", "pinwheel", "2spirals")


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as ``(train, test)`` levels ``(N, 1, 8, 8)`` int64, a fixed seeded split."""
    train, test, _, _ = digits_split_labelled()
    return train, test


def digits_split_labelled() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`digits_split` with the class labels: ``(train, test, train_labels, test_labels)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.int64)[:, None]  # values 0..16
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    n_test = int(round(TEST_FRACTION * len(images)))
    train, test = order[n_test:], order[:n_test]
    return images[train], images[test], digits.target[train], digits.target[test]


def toy_density(name: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points from a named 2D toy density, float32 ``(n, 2)``."""
    rng = np.random.default_rng(seed)
    if name == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(n, noise=0.05, random_state=seed)
        x = (x - np.array([0.5, 0.25])) * 2.0
    elif name == "8gaussians":
        centers = np.array([(np.cos(a), np.sin(a)) for a in np.arange(8) * np.pi / 4]) * 2.0
        x = centers[rng.integers(0, 8, n)] + 0.1 * rng.standard_normal((n, 2))
    elif name == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2 - 2 + np.floor(x1) % 2
        x = np.stack([x1, x2], 1)
    elif name == "pinwheel":
        arms, per = 5, np.ceil(n / 5).astype(int)
        radial = rng.normal(1.0, 0.3, (arms * per,))
        tangential = rng.normal(0.0, 0.05, (arms * per,))
        labels = np.repeat(np.arange(arms), per)
        angles = labels * 2 * np.pi / arms + 0.25 * np.exp(radial)
        x = (
            np.stack(
                [
                    radial * np.cos(angles) - tangential * np.sin(angles),
                    radial * np.sin(angles) + tangential * np.cos(angles),
                ],
                1,
            )[:n]
            * 1.5
        )
        x = x[rng.permutation(n)]
    elif name == "2spirals":
        t = np.sqrt(rng.uniform(0, 1, n)) * 540 * (2 * np.pi) / 360
        sign = rng.integers(0, 2, n) * 2 - 1
        x = sign[:, None] * np.stack([-np.cos(t) * t, np.sin(t) * t], 1) / 3 + 0.1 * rng.standard_normal((n, 2))
    else:
        raise BadInput(f"unknown toy density {name!r}; choose one of {', '.join(TOY_DENSITIES)}")
    return x.astype(np.float32)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), optionally gzipped."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] != 0x08:
        raise BadInput(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise BadInput(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def read_png_folder(path: str | Path) -> np.ndarray:
    """All PNGs of a folder (sorted by name) as ``(N, C, H, W)`` uint8 levels."""
    from PIL import Image

    files = sorted(Path(path).glob("*.png"))
    if not files:
        raise BadInput(f"{path} holds no .png files")
    images = [np.asarray(Image.open(f)) for f in files]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise BadInput(f"{path} holds PNGs of different shapes: {sorted(shapes)}")
    stack = np.stack(images)
    return stack[:, None] if stack.ndim == 3 else stack.transpose(0, 3, 1, 2)


CIFAR_RECORD = 1 + 3 * 32 * 32


def read_cifar_binary(path: str | Path) -> np.ndarray:
    """A CIFAR-10 binary batch (``data_batch_N.bin``, ``test_batch.bin``): ``(N, 3, 32, 32)`` uint8.

    Each record is a label byte and 3,072 pixel bytes (the red, green and blue planes, row-major).
    """
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise BadInput(f"{path} is not a CIFAR-10 binary batch (its size is not a multiple of {CIFAR_RECORD} bytes)")
    return raw.reshape(-1, CIFAR_RECORD)[:, 1:].reshape(-1, 3, 32, 32)


def _is_pickled_cifar(path: Path) -> bool:
    return path.suffix == "" and (path.name.startswith("data_batch_") or path.name == "test_batch")


def load_array(path: str | Path, key: str | None = None, mmap: bool = False) -> np.ndarray:
    """Load ``.npy``, ``.npz`` (first array or ``key``), IDX (``-idx*-ubyte[.gz]``), a CIFAR-10 binary batch
    (``.bin``) or a PNG folder.

    ``mmap``: a ``.npy`` file is memory-mapped read-only instead of read (scoring streams it by batches).
    """
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path} does not exist")
    if path.is_dir():
        return read_png_folder(path)
    if _is_pickled_cifar(path):
        raise BadInput(
            f"{path} is a pickled CIFAR-10 batch and acf-deploy never unpickles data; "
            "use the binary version (cifar-10-binary: data_batch_N.bin, test_batch.bin)"
        )
    if path.suffix == ".bin":
        return read_cifar_binary(path)
    try:
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = archive.files
                if not names:
                    raise BadInput(f"{path} holds no arrays")
                name = key or ("x" if "x" in names else names[0])
                if name not in names:
                    raise BadInput(f"{path} has no array {name!r}; it has {', '.join(names)}")
                return archive[name]
    except (ValueError, OSError, EOFError, MemoryError) as exc:
        raise BadInput(f"{path} cannot be read as {path.suffix} ({exc.__class__.__name__}); is it corrupt?") from None
    if "idx" in path.name:
        return read_idx(path)
    raise BadInput(
        f"{path}: unsupported data format; use .npy, .npz, an IDX file, a CIFAR-10 .bin batch or a folder of PNGs"
    )


#: Bytes of data validated at a time, so a memory-mapped file is never read into memory whole.
CHECK_CHUNK_BYTES = 1 << 24


def _check_samples(array: np.ndarray, data_shape: tuple[int, ...]) -> None:
    """``(N, *data_shape)`` with ``N >= 1`` real numbers: no booleans, complex numbers, strings or records."""
    if array.ndim != len(data_shape) + 1 or tuple(array.shape[1:]) != tuple(data_shape):
        raise BadInput(f"data has shape {tuple(array.shape)}, the model expects (N, {', '.join(map(str, data_shape))})")
    if array.dtype.kind not in "iuf":
        raise BadInput(f"data have dtype {array.dtype}; the model takes real numbers (integers or floats)")
    if len(array) == 0:
        raise BadInput("data hold no samples")


def _chunks(array: np.ndarray):
    rows = max(1, CHECK_CHUNK_BYTES // max(1, array[0].nbytes))
    for start in range(0, len(array), rows):
        yield array[start : start + rows]


def check_levels(array: np.ndarray, data_shape: tuple[int, ...], n_levels: int) -> np.ndarray:
    """Validate image data as integer levels ``(N, *data_shape)`` in ``[0, K-1]``, without copying them.

    Also accepted: ``(N, H, W)`` for one channel and channels-last ``(N, H, W, C)``.
    """
    if array.ndim == len(data_shape) and tuple(array.shape[1:]) == tuple(data_shape[1:]) and data_shape[0] == 1:
        array = array[:, None]
    channels_last = (*data_shape[1:], data_shape[0])
    if array.ndim == 4 and tuple(array.shape[1:]) == channels_last and tuple(array.shape[1:]) != tuple(data_shape):
        array = array.transpose(0, 3, 1, 2)
    _check_samples(array, data_shape)
    for chunk in _chunks(array):
        if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            raise BadInput("data contain NaN or infinite values")
        integral = chunk.dtype.kind != "f" or bool(np.all(chunk == np.round(chunk)))
        if not integral or chunk.min() < 0 or chunk.max() > n_levels - 1:
            raise BadInput(f"image data must be integer levels in [0, {n_levels - 1}] (the dataset's native levels)")
    return array


def as_levels(array: np.ndarray, data_shape: tuple[int, ...], n_levels: int) -> np.ndarray:
    """:func:`check_levels`, as ``int64`` in memory."""
    return check_levels(array, data_shape, n_levels).astype(np.int64)


def check_points(array: np.ndarray, data_shape: tuple[int, ...]) -> np.ndarray:
    """Validate toy data as finite real points ``(N, *data_shape)``, without copying them."""
    _check_samples(array, data_shape)
    for chunk in _chunks(array):
        if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            raise BadInput("data contain NaN or infinite values")
    return array


def heldout_data(config: dict, path: str | Path | None = None, seed: int = 0) -> np.ndarray | None:
    """Held-out data for calibration and checks, in the model's levels (points for the toy).

    ``path`` if given; else the preset's test split (digits, a toy density, its local data file); ``None``
    when the model's data are not available offline (an imported model exported without ``--data``).
    """
    if path is not None:
        array = load_array(path)
        if config["n_levels"]:
            return as_levels(array, tuple(config["data_shape"]), int(config["n_levels"]))
        return np.asarray(check_points(array, tuple(config["data_shape"])), dtype=np.float32)
    if config["data"] == "digits" or config["data"] in TOY_DENSITIES or config.get("data_path"):
        return training_data(config, seed=seed)[1]
    return None


def training_data(config: dict, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` for a preset config: digits, a toy density, or local files (``config['data_path']``)."""
    name = config["data"]
    if name == "digits":
        train, test = digits_split()
        n_train = config.get("train", {}).get("train_size")  # optional subsample (smoke tests, experiments)
        return (train[: int(n_train)] if n_train else train), test
    if name in TOY_DENSITIES:
        n_train = int(config.get("train", {}).get("train_size", 20000))
        return toy_density(name, n_train, seed=seed), toy_density(name, 5000, seed=seed + 10_000)
    path = config.get("data_path")
    if not path:
        raise BadInput(
            f"preset data {name!r} is read from local files: pass --data PATH (.npz with x_train/x_test, IDX)"
        )
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "x_train" in archive.files and "x_test" in archive.files:
                train, test = archive["x_train"], archive["x_test"]
            else:
                train = test = None
        if train is None:
            whole = load_array(path)
            n_test = max(1, int(len(whole) * TEST_FRACTION))
            train, test = whole[n_test:], whole[:n_test]
    else:
        whole = load_array(path)
        n_test = max(1, int(len(whole) * TEST_FRACTION))
        train, test = whole[n_test:], whole[:n_test]
    shape = tuple(config["data_shape"])
    if train.ndim == 4 and train.shape[-1] == shape[0] and train.shape[1] != shape[0]:
        train, test = train.transpose(0, 3, 1, 2), test.transpose(0, 3, 1, 2)
    levels = int(config["n_levels"])
    return as_levels(train, shape, levels), as_levels(test, shape, levels)


def to_model_space(
    batch: np.ndarray, config: dict[str, Any], generator: torch.Generator | None, mid: bool = False
) -> torch.Tensor:
    """Levels to dequantised ``[0, 1]`` data for images; float points unchanged for the toy.

    The one entry into the model's data space (docs/guarantees.md §1) for training, export, checks and reports;
    PyTorch is imported here, so the data readers above stay usable without it.
    """
    import torch

    from .flows.layers import dequantize

    tensor = torch.as_tensor(batch)
    if config["n_levels"]:
        return dequantize(tensor, config["n_levels"], generator=generator, mid=mid)
    return tensor.to(torch.get_default_dtype())
