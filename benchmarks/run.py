"""Speed and memory of the monai-covid pipeline, measured in one run on whatever machine runs it.

    python benchmarks/run.py [--quick] [--json FILE] [--data ../shared/data]

Keys (``--json``):
- ``e2e_seconds_per_series``: ``monai-covid infer`` end to end (decode, HU, lung mask, lesion segmentation, NIfTI +
  DICOM SEG + report) on the real 512x512 series P001, per series normalised to 150 slices;
- ``plain_monai_seconds_per_series`` and ``speedup_vs_plain_monai``: the same network and outputs through a plain
  MONAI pipeline (LoadImage with ITKReader, ScaleIntensityRange, SliceInferer with a default sliding window at native
  resolution, SaveImage for the masks; the same lung mask and DICOM SEG writer), measured in the same run;
- ``startup_seconds``: the fixed part of that (interpreter and imports), paid once per batch, not per series;
- ``stage_*_s``: where the time of the case goes (decode, lung mask, lesion segmentation, NIfTI, DICOM SEG, overlay),
  timed in-process;
- ``cache_speedup``: one training epoch with CacheDataset against plain Dataset, same transforms and data: 2D lesion
  training on slices sampled from the CT series (decode, HU window and resize cached; sampling and flips random);
- ``peak_rss_gb``: peak resident memory of ``monai-covid infer`` on a synthetic 630x630x300 CT volume;
- ``gpu_slices_per_s_lesion_amp`` / ``gpu_slices_per_s_detector_amp``: 512x512 slices per second on a GPU with AMP
  (``null`` without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "covid_ct_lesion_asegnet"


def _infer(inp: Path, out: Path, *extra: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one ``monai-covid infer`` run in a fresh process."""
    cmd = [sys.executable, "-c", (
        "import resource, sys; from monai_covid.cli import main; rc = main(sys.argv[1:]); "
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"),
        "infer", str(inp), str(out), "--quiet", "--overwrite", "--models", "asegnet", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"infer failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    peak_kb = int(next(ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("PEAK_RSS_KB")))
    return seconds, peak_kb / 1024 / 1024


def plain_monai_pipeline(series_dir: Path, out: Path) -> float:
    """The same network and outputs through a plain MONAI pipeline; returns wall seconds."""
    from monai.data import ITKReader
    from monai.inferers import SliceInferer
    from monai.transforms import EnsureChannelFirst, LoadImage, SaveImage, ScaleIntensityRange

    from data_prep.io import read_dicom_series
    from data_prep.lung import lung_mask
    from monai_covid.batch import write_dicom_seg
    from monai_covid.inference.lesion import HU_WINDOW, load_bundle_network

    t0 = time.perf_counter()
    net = load_bundle_network(BUNDLE, "cpu")
    img = EnsureChannelFirst()(LoadImage(reader=ITKReader(), image_only=True)(str(series_dir)))  # (1, x, y, z)
    x = ScaleIntensityRange(a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True)(img)
    inferer = SliceInferer(roi_size=(256, 256), spatial_dim=2)  # defaults: sw_batch_size=1, overlap=0.25
    with torch.no_grad():
        prob = inferer(x[None].float(), lambda t: torch.softmax(net(t), 1))[0, 1]
    hu = np.transpose(np.asarray(img[0]), (2, 1, 0))  # (x, y, z) -> (z, y, x) for the lung mask
    vol = read_dicom_series(series_dir)  # headers for the DICOM SEG (the plain pipeline has no series model)
    lung = lung_mask(hu, vol.spacing)
    lesion_xyz = (prob.numpy() > 0.5) & np.transpose(lung, (2, 1, 0))
    saver = SaveImage(output_dir=str(out), output_postfix="lesion", separate_folder=False, print_log=False)
    saver(torch.as_tensor(lesion_xyz[None].astype(np.uint8)), meta_data=img.meta)
    saver_l = SaveImage(output_dir=str(out), output_postfix="lung", separate_folder=False, print_log=False)
    saver_l(torch.as_tensor(np.transpose(lung, (2, 1, 0))[None].astype(np.uint8)), meta_data=img.meta)
    write_dicom_seg(np.transpose(lesion_xyz, (2, 1, 0)), vol, out / "lesion_seg.dcm", "asegnet")
    return time.perf_counter() - t0


from monai.transforms import Transform


class _LoadCT(Transform):
    """Deterministic, expensive part: decode the series, HU window, (1, z, 256, 256) slices. (A MONAI ``Transform``,
    so that CacheDataset caches it: it caches up to the first random or non-Transform callable.)"""

    def __call__(self, d: dict) -> dict:
        import torch.nn.functional as F

        from data_prep.intensity import HUWindow
        from data_prep.io import read_volume
        from monai_covid.inference.lesion import HU_WINDOW

        v = read_volume(d["image"])
        x = torch.as_tensor(HUWindow(*HU_WINDOW)(v.array))
        x = F.interpolate(x[:, None], size=(256, 256), mode="bilinear", align_corners=False)[:, 0]
        return {"image": x[None]}


def _sample_slices_transform():
    from monai.transforms import Randomizable, Transform

    class SampleSlices(Randomizable, Transform):
        """Random part: 8 random axial slices of the cached volume, with a random left-right flip."""

        def randomize(self, n: int) -> None:
            self.idx = self.R.choice(n, size=8, replace=n < 8)
            self.flip = self.R.rand() < 0.5

        def __call__(self, d: dict) -> dict:
            x = d["image"][0]
            self.randomize(x.shape[0])
            s = x[torch.as_tensor(self.idx)][:, None]
            return {"image": torch.flip(s, dims=(-1,)) if self.flip else s}

    return SampleSlices()


def cache_benchmark(series: list[Path], epochs: int = 2) -> dict[str, float]:
    """Seconds per training epoch with Dataset and with CacheDataset: 2D lesion training on slices sampled from CT
    volumes (decode + HU window + resize cached; slice sampling and flips random), one A-SegNet step per volume."""
    from monai.bundle import ConfigParser
    from monai.data import CacheDataset, Dataset
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE)})
    net = parser.get_parsed_content("network_def")
    loss_fn = torch.nn.BCEWithLogitsLoss()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    datalist = [{"image": str(s)} for s in series]
    transform = Compose([_LoadCT(), _sample_slices_transform()])

    def epoch(ds) -> float:
        t0 = time.perf_counter()
        for i in range(len(ds)):
            x = ds[i]["image"]
            opt.zero_grad()
            logits = net(x)[:, 1:]
            loss = loss_fn(logits, (x > 0.3).float())  # a stand-in target: the step's cost is what is measured
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    t_plain = min(epoch(Dataset(datalist, transform=transform)) for _ in range(epochs))
    t0 = time.perf_counter()
    cached = CacheDataset(datalist, transform=transform, cache_rate=1.0, num_workers=0, progress=False)
    t_fill = time.perf_counter() - t0
    t_cache = min(epoch(cached) for _ in range(epochs))
    return {"epoch_seconds_dataset": t_plain, "epoch_seconds_cachedataset": t_cache, "cache_fill_seconds": t_fill,
            "cache_speedup": t_plain / t_cache}


def stage_profile(series_dir: Path) -> dict[str, float]:
    """Where the time of one CT case goes: seconds per stage of ``process_ct_case``, run in this process (warm)."""
    from data_prep.io import read_volume, write_like
    from data_prep.lung import lung_mask
    from monai_covid.batch import ModelSet, overlay_montage, write_dicom_seg

    models = ModelSet(["asegnet"], device="cpu")
    models.net("asegnet")  # load the weights outside the timings
    stages: dict[str, float] = {}

    def timed(name, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        stages[f"stage_{name}_s"] = time.perf_counter() - t0
        return out

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vol = timed("decode", read_volume, series_dir)
        lung = timed("lung_mask", lung_mask, vol.array, vol.spacing)
        lesion = timed("lesion_seg", models.segment_lesions, vol.array, lung).astype(bool) & lung
        timed("write_nifti", lambda: (write_like(lung.astype(np.uint8), vol, tmp / "l.nii.gz"),
                                      write_like(lesion.astype(np.uint8), vol, tmp / "s.nii.gz")))
        timed("dicom_seg", write_dicom_seg, lesion, vol, tmp / "seg.dcm", "asegnet")
        timed("overlay", overlay_montage, vol.array, lung, lesion)
    return stages


def synthetic_ct(path: Path, shape=(300, 630, 630)) -> None:
    import SimpleITK as sitk

    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    ct = np.full(shape, -1000, np.int16)
    cy, cx = shape[1] / 2, shape[2] / 2
    ct[np.broadcast_to(((y - cy) / (0.42 * shape[1])) ** 2 + ((x - cx) / (0.47 * shape[2])) ** 2 < 1, shape)] = 40
    for sx in (0.3, 0.7):
        lung = ((y - cy) / (0.3 * shape[1])) ** 2 + ((x - sx * shape[2]) / (0.14 * shape[2])) ** 2 < 1
        ct[np.broadcast_to(lung, shape) & (z > 10) & (z < shape[0] - 10)] = -850
    rng = np.random.default_rng(0)
    ct += rng.integers(-20, 20, size=shape[1:], dtype=np.int16)[None]
    img = sitk.GetImageFromArray(ct)
    img.SetSpacing((0.6, 0.6, 1.0))
    sitk.WriteImage(img, str(path))


def gpu_throughput(n: int = 512) -> dict[str, float | None]:
    if not torch.cuda.is_available():
        return {"gpu_slices_per_s_lesion_amp": None, "gpu_slices_per_s_detector_amp": None}
    from monai_covid.inference.lesion import load_bundle_network, segment_volume

    net = load_bundle_network(BUNDLE, "cuda")  # channels-last on CUDA
    hu = np.random.default_rng(0).normal(-500, 300, size=(n, 512, 512)).astype(np.float32)
    segment_volume(net, hu[:32], None, device="cuda", batch_size=32)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    segment_volume(net, hu, None, device="cuda", batch_size=64, chunk_slices=128)
    torch.cuda.synchronize()
    res = {"gpu_slices_per_s_lesion_amp": n / (time.perf_counter() - t0), "gpu_slices_per_s_detector_amp": None}
    det = REPO / "bundles" / "covid_ct_volume_resnextplus"
    if (det / "models" / "model.pt").is_file():
        from monai_covid.volume_detector import predict_volume

        dnet = load_bundle_network(det, "cuda")
        lung = hu > -2000
        predict_volume(dnet, hu[:32], lung[:32], device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        predict_volume(dnet, hu, lung, device="cuda")
        torch.cuda.synchronize()
        res["gpu_slices_per_s_detector_amp"] = n / (time.perf_counter() - t0)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description="monai-covid benchmarks")
    p.add_argument("--quick", action="store_true", help="the 30-slice shipped sample instead of the 148-slice series, "
                   "one cache epoch, a 630x630x120 volume for memory")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--data", default=os.environ.get("MONAI_COVID_DATA", str(REPO.parent / "shared" / "data")))
    a = p.parse_args()
    data = Path(a.data)
    series = REPO / "samples" / "ct_dicom" / "P001_slices60-89" if a.quick else data / "ct_dicom" / "P001"
    res: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/run.py" + (" --quick" if a.quick else ""),
    }
    from data_prep.io import read_dicom_series

    n = read_dicom_series(series).n_slices
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inp = tmp / "in"
        shutil.copytree(series, inp / series.name)
        _infer(inp, tmp / "warm")  # warm the file cache and imports once
        sec, _ = _infer(inp, tmp / "out")
        res["e2e_seconds_per_series"] = sec * 150 / n
        t0 = time.perf_counter()  # the fixed cost in that time: interpreter, torch/monai/highdicom imports
        subprocess.run([sys.executable, "-c", "import monai_covid.batch, data_prep.lung, monai.inferers, highdicom"],
                       check=True, capture_output=True)
        res["startup_seconds"] = time.perf_counter() - t0
        res["series_slices"] = n
        plain = plain_monai_pipeline(inp / series.name, tmp / "plain")
        res["plain_monai_seconds_per_series"] = plain * 150 / n
        res["speedup_vs_plain_monai"] = plain / sec
        res.update(stage_profile(inp / series.name))
        cache_series = [series, series] if a.quick else [data / "ct_dicom" / "P001", data / "ct_dicom" / "normal001"]
        res.update(cache_benchmark(cache_series, epochs=1 if a.quick else 2))
        big = tmp / "big"
        big.mkdir()
        synthetic_ct(big / "ct630.nii.gz", shape=(120 if a.quick else 300, 630, 630))
        big_sec, peak = _infer(big, tmp / "big_out")
        res["peak_rss_gb"] = peak
        res["peak_rss_volume"] = f"630x630x{120 if a.quick else 300}"
        res["big_volume_seconds"] = big_sec
    res.update(gpu_throughput())
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
