"""Picture of what the MONAI Label server returns for one CT: lesion and lung masks over an axial slice.

Asks a running server (``make label``) for ``lesion_asegnet``, ``lung`` and ``covid_resnextplus`` on one study and
draws the slice with the most lesion, in the lung window, lesions in red and the lung outline in green, with the
classifier's answer in the title. Runs in the core environment (matplotlib, SimpleITK)::

    .venv/bin/python monailabel_app/figure.py --studies out/label_studies --image P001_slices60-89 \\
        --out docs/monailabel_result.png

Only a server on this machine is contacted (127.0.0.1 / localhost, proxies bypassed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _post(url: str, timeout: float = 600.0) -> tuple[bytes, float]:
    t = time.monotonic()
    with _opener.open(urllib.request.Request(url, method="POST", data=b""), timeout=timeout) as resp:
        return resp.read(), time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="http://127.0.0.1:8000")
    ap.add_argument("--studies", type=Path, required=True, help="the server's studies folder")
    ap.add_argument("--image", required=True, help="image id (file name without .nii.gz)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if urlparse(args.server).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"{args.server}: only a local server (127.0.0.1) is contacted")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(args.studies / f"{args.image}.nii.gz"))).astype(np.float32)
    masks, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("lesion_asegnet", "lung"):
            body, seconds[model] = _post(f"{args.server}/infer/{model}?image={args.image}&output=image")
            path = Path(tmp) / f"{model}.nii.gz"
            path.write_bytes(body)
            masks[model] = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(bool)
    body, seconds["covid_resnextplus"] = _post(f"{args.server}/infer/covid_resnextplus?image={args.image}&output=json")
    cls = json.loads(body)

    lesion, lung = masks["lesion_asegnet"], masks["lung"]
    z = int(np.argmax(lesion.sum(axis=(1, 2)))) if lesion.any() else ct.shape[0] // 2
    gray = np.clip((ct[z] + 1350.0) / 1500.0, 0, 1)  # lung window: level -600, width 1500
    rgb = np.stack([gray] * 3, -1)
    les = lesion[z]
    rgb[les] = 0.45 * rgb[les] + 0.55 * np.array([1.0, 0.12, 0.12])
    edge = lung[z] & ~ndi.binary_erosion(lung[z], iterations=2)
    rgb[edge] = (0.16, 0.86, 0.31)

    fig, ax = plt.subplots(figsize=(4.2, 4.6), dpi=100)
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(
        f"{args.image}, slice {z}: lesions (red), lungs (green)\n"
        f"ResNeXt+ COVID-19 probability {cls['covid_probability']:.3f}",
        fontsize=8,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_png = args.out.with_suffix(".tmp.png")
    fig.savefig(tmp_png)
    tmp_png.replace(args.out)  # atomic
    print(json.dumps({"slice": z, "seconds": {k: round(v, 2) for k, v in seconds.items()},
                      "lesion_voxels": int(lesion.sum()), "covid_probability": cls["covid_probability"]}))


if __name__ == "__main__":
    main()
