"""PNG outputs: sample grids for images, density plots for the 2D toy flows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .fileio import atomic_path


def tile_images(images: np.ndarray, cols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images (values clipped to ``[0, 1]``) into one ``(rows, cols, C)`` canvas, white gaps."""
    images = np.clip(np.nan_to_num(np.asarray(images, dtype=np.float32)), 0.0, 1.0)
    n, c, h, w = images.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    return canvas


def save_grid(images: np.ndarray, target: str | Path, scale: int = 4, pad: int = 1) -> Path:
    """Tile ``(N, C, H, W)`` images with values in ``[0, 1]`` into one PNG (written atomically)."""
    from PIL import Image

    canvas = tile_images(images, pad=pad)
    pixels = (canvas * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels[..., 0] if canvas.shape[-1] == 1 else pixels)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    target = Path(target)
    with atomic_path(target) as tmp:
        picture.save(tmp, format="PNG")
    return target


def save_density_plot(log_density: np.ndarray, extent: float, samples: np.ndarray | None, target: str | Path) -> Path:
    """Heat map of a 2D density on ``[-extent, extent]^2`` with optional samples, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if samples is not None else 1, figsize=(8 if samples is not None else 4, 4))
    axes = np.atleast_1d(axes)
    axes[0].imshow(np.exp(log_density), origin="lower", extent=(-extent, extent, -extent, extent), cmap="magma")
    axes[0].set_title("model density")
    if samples is not None:
        axes[1].scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5)
        axes[1].set_xlim(-extent, extent)
        axes[1].set_ylim(-extent, extent)
        axes[1].set_aspect("equal")
        axes[1].set_title("samples")
    fig.tight_layout()
    target = Path(target)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return target
