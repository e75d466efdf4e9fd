"""Docs figure: X-ray | ground truth | infection map (RGBA from inference.json laid over the X-ray), a few rows.

Usage: python scripts/example_figure.py IMAGES_DIR MASKS_DIR INFERENCE_OUT FIGURE.png name1.png name2.png ...
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from monai_covid.io_utils import atomic_write_bytes  # noqa: E402


def main(images: str, masks: str, out: str, figure: str, *names: str) -> None:
    fig, axes = plt.subplots(len(names), 3, figsize=(6.0, 2.0 * len(names)), dpi=80, squeeze=False)
    for row, name in zip(axes, names):
        xray = np.asarray(Image.open(Path(images) / name).convert("L"))
        gt = np.asarray(Image.open(Path(masks) / name).convert("L")) > 127
        rgba = np.asarray(Image.open(Path(out) / f"{Path(name).stem}_map.png"))
        row[0].imshow(xray, cmap="gray")
        row[1].imshow(xray, cmap="gray")
        row[1].contour(gt, levels=[0.5], colors="yellow", linewidths=0.8)
        row[2].imshow(xray, cmap="gray")
        row[2].imshow(rgba)
        row[0].set_ylabel(Path(name).stem, fontsize=7)
        for ax, title in zip(row, ("X-ray", "ground truth", "infection map")):
            ax.set_xticks([]), ax.set_yticks([])
            if row is axes[0]:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(figure, buf.getvalue())


if __name__ == "__main__":
    main(*sys.argv[1:])
