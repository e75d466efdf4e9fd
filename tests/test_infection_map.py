"""Infection maps (jet hue/saturation, X-ray value, transparency), the detection rule and X-ray reading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.colors import rgb_to_hsv
from PIL import Image

from monai_covid.infection_map import (
    InfectionMap,
    InfectionMapd,
    InfectionMapWriter,
    LoadXrayd,
    covid_detected,
    covid_probability,
    infected_area_percent,
    infection_map,
    read_xray,
    xray_datalist,
)


def _synthetic():
    prob = np.zeros((4, 5), np.float32)
    prob[0, 0] = 1.0
    prob[1, 1] = 0.5
    prob[2, 2] = 0.25
    prob[3, 3] = 0.005  # below the "zero" floor
    image = (np.arange(20, dtype=np.float32).reshape(4, 5) * 12 + 10) / 255.0
    return prob, image


def test_infection_map_pixels():
    prob, image = _synthetic()
    rgba = infection_map(prob, image)
    assert rgba.shape == (4, 5, 4) and rgba.dtype == np.uint8
    grey = np.round(image * 255).astype(np.uint8)
    # zero probability: fully transparent, RGB is the grey X-ray
    for y, x in [(0, 1), (3, 4), (3, 3)]:
        assert rgba[y, x, 3] == 0
        assert (rgba[y, x, :3] == grey[y, x]).all()
    # p = 1: hue and saturation of jet(1) (dark red: hue 0, saturation 1), value of the X-ray
    hsv = rgb_to_hsv(rgba[..., :3].astype(np.float32) / 255.0)
    jet_hsv = rgb_to_hsv(np.asarray(colormaps["jet"]([1.0, 0.5, 0.25])[:, :3]))
    assert rgba[0, 0, 3] == 255
    assert tuple(rgba[0, 0, :3]) == (grey[0, 0], 0, 0)
    assert hsv[0, 0, 0] == pytest.approx(jet_hsv[0, 0], abs=1e-6)
    assert hsv[0, 0, 1] == pytest.approx(1.0)
    # every shown pixel: value channel = image, hue = jet's hue at that probability
    for (y, x), j in zip([(0, 0), (1, 1), (2, 2)], range(3)):
        assert rgba[y, x, :3].max() == grey[y, x]
        assert hsv[y, x, 0] == pytest.approx(jet_hsv[j, 0], abs=0.02)
    assert hsv[1, 1, 0] != pytest.approx(hsv[2, 2, 0], abs=0.05)  # 0.5 (green) and 0.25 (blue-cyan) differ


def test_infection_map_transforms_and_shapes():
    prob, image = _synthetic()
    a = InfectionMap()(torch.from_numpy(prob)[None], torch.from_numpy(image)[None])
    d = InfectionMapd(keys="pred", image_key="xray")({"pred": prob[None], "xray": image[None]})
    assert (a == infection_map(prob, image)).all() and (d["infection_map"] == a).all()
    with pytest.raises(ValueError, match="differ"):
        infection_map(prob, image[:3])


@pytest.mark.parametrize(
    "peak, detected",
    [(0.0, False), (0.49, False), (0.4999, False), (0.5, True), (0.93, True)],
)
def test_detection_rule(peak, detected):
    prob = np.full((8, 8), 0.1, np.float32)
    prob[3, 4] = peak if peak > 0.1 else prob[3, 4]
    assert covid_detected(prob) is detected
    assert covid_probability(prob) == pytest.approx(max(peak, 0.1))


def test_infected_area_percent():
    prob = np.zeros((10, 10), np.float32)
    prob[:2] = 0.7
    prob[2, :5] = 0.5
    assert infected_area_percent(prob) == pytest.approx(25.0)
    assert infected_area_percent(prob, threshold=0.6) == pytest.approx(20.0)


def _write_dicom(path, modality="CR", photometric="MONOCHROME2"):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Modality, ds.SOPClassUID, ds.SOPInstanceUID = modality, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    arr = (np.arange(40 * 30, dtype=np.uint16).reshape(40, 30) * 3)
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return arr


def test_read_xray_png_and_dicom(shared_data, tmp_path):
    png = sorted((shared_data / "cxr_infection" / "train" / "covid" / "images").glob("*.png"))[0]
    arr = read_xray(png)
    ref = np.asarray(Image.open(png).convert("L"), np.float32) / 255.0
    assert arr.shape == ref.shape == (256, 256) and np.array_equal(arr, ref)
    d = LoadXrayd(keys="image")({"image": str(png)})
    assert d["image"].shape == (1, 256, 256) and d["image"].meta["filename_or_obj"] == str(png)

    raw = _write_dicom(tmp_path / "cr.dcm")
    x = read_xray(tmp_path / "cr.dcm")
    assert x.shape == (40, 30) and x[0, 0] == 0.0 and x[-1, -1] == 1.0  # rows top to bottom, [0, 1]
    _write_dicom(tmp_path / "mono1", photometric="MONOCHROME1")  # no suffix: found by the DICM preamble
    assert read_xray(tmp_path / "mono1")[0, 0] == 1.0 and raw.shape == (40, 30)  # MONOCHROME1 inverted
    _write_dicom(tmp_path / "ct.dcm", modality="CT")
    with pytest.raises(ValueError, match="Modality CT"):
        read_xray(tmp_path / "ct.dcm")


def test_xray_datalist_reports_bad_files(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.full((32, 40), 100, np.uint8)).save(src / "ok.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (src / "notes.txt").write_text("ignored")
    _write_dicom(src / "ct.dcm", modality="CT")
    items = xray_datalist(src)
    err = capsys.readouterr().err.strip().splitlines()
    assert [i["image"] for i in items] == [str(src / "ok.png")]
    assert len(err) == 2 and any("broken.png" in e for e in err) and any("ct.dcm" in e and "CT" in e for e in err)
    with pytest.raises(ValueError, match="inside the input"):
        xray_datalist(src, output_dir=src / "out")


def test_writer_outputs(tmp_path):
    prob, image = _synthetic()
    w = InfectionMapWriter(tmp_path)
    row = w.write_one(prob[None], image[None], "/x/case 1.png")
    w._write_csv()
    seg = np.asarray(Image.open(tmp_path / "case 1_seg.png"))
    rgba = np.asarray(Image.open(tmp_path / "case 1_map.png"))
    assert seg.shape == (4, 5) and set(np.unique(seg)) == {0, 255} and seg[1, 1] == 255 and seg[2, 2] == 0
    assert rgba.shape == (4, 5, 4) and (rgba == infection_map(prob, image)).all()
    assert row["covid_detected"] == 1 and float(row["infected_area_percent"]) == pytest.approx(10.0)
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "image,covid_probability,covid_detected,infected_area_percent"
    assert lines[1] == "case 1.png,1.0000,1,10.00"
