"""End to end: the MONAI Label app (``monailabel_app/``) serving our bundles over HTTP on 127.0.0.1.

The server runs in its own environment ``.venv-label`` (``make label-env``; MONAI Label's pins clash with the core's),
started here as a subprocess on a free port with a studies folder holding the shipped real CT sample converted to
NIfTI (and, when the data are there, one real chest X-ray). The test reads ``/info``, asks for the lung mask, the
lesion mask and the COVID-19 classification of the CT, checks what comes back, and always stops the server.

Skipped when ``.venv-label`` (``MONAI_COVID_LABEL_VENV`` overrides) does not exist, unless ``MONAI_COVID_LABEL_TEST=1`` (``make test-label``, CI), which
makes a missing environment a failure. Only 127.0.0.1 is contacted (proxies are bypassed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LABEL_VENV = Path(os.environ.get("MONAI_COVID_LABEL_VENV", REPO / ".venv-label"))
LABEL_PYTHON = LABEL_VENV / "bin" / "python"
APP_DIR = REPO / "monailabel_app"
HOST = "127.0.0.1"
READY_TIMEOUT_S = 240
INFER_TIMEOUT_S = 240
CT_ID = "ct_sample"
CXR_ID = "cxr_sample"
CXR_BUNDLE = REPO / "bundles" / "covid_cxr_infection_map_unet" / "models" / "model.pt"
DATA_DIR = Path(os.environ.get("MONAI_COVID_DATA", REPO.parent / "shared" / "data"))
CXR_IMAGES = DATA_DIR / "cxr_infection" / "train" / "covid" / "images"

# urllib without any proxy: requests go straight to 127.0.0.1
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _required() -> bool:
    return os.environ.get("MONAI_COVID_LABEL_TEST", "") not in ("", "0", "false", "False")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _request(url: str, method: str = "GET", timeout: float = 30.0) -> tuple[int, bytes, str]:
    assert url.startswith(f"http://{HOST}:"), url
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with _opener.open(req, timeout=timeout) as resp:
        return resp.status, resp.read(), resp.headers.get("content-type", "")


@pytest.fixture(scope="module")
def label_python() -> Path:
    if not LABEL_PYTHON.exists():
        msg = f"{LABEL_VENV} not built (make label-env)"
        if _required():
            pytest.fail(msg + " and MONAI_COVID_LABEL_TEST=1")
        pytest.skip(msg + "; set MONAI_COVID_LABEL_TEST=1 to require it")
    return LABEL_PYTHON


@pytest.fixture(scope="module")
def studies(tmp_path_factory, sample_series, label_python) -> Path:
    """The shipped 30-slice real CT as NIfTI (int16 HU, the DICOM geometry), plus one real CXR when the data are
    there and the CXR bundle has weights."""
    from data_prep.io import read_volume, write_like

    root = tmp_path_factory.mktemp("label_studies")
    vol = read_volume(sample_series)
    write_like(np.round(vol.array).astype(np.int16), vol, root / f"{CT_ID}.nii.gz")
    if CXR_BUNDLE.is_file() and CXR_IMAGES.is_dir():
        first = sorted(p for p in CXR_IMAGES.iterdir() if p.suffix.lower() == ".png")[0]
        shutil.copyfile(first, root / f"{CXR_ID}.png")
    return root


@pytest.fixture(scope="module")
def server(label_python, studies, tmp_path_factory):
    """``monailabel start_server`` on a free 127.0.0.1 port; yields (base url, timings); always stopped."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("label_server") / "server.log"
    env = dict(os.environ)
    env.update(
        {
            "NO_PROXY": HOST,
            "no_proxy": HOST,
            "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
            "MONAI_LABEL_SESSIONS": "false",
            "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    cmd = [
        str(label_python), "-m", "monailabel.main", "start_server",
        "--app", str(APP_DIR), "--studies", str(studies),
        "--host", HOST, "--port", str(port), "--conf", "skip_trainers", "true",
    ]  # fmt: skip
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://{HOST}:{port}"
    timings: dict[str, float] = {}
    try:
        deadline = t0 + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                status, _, _ = _request(f"{base}/info/", timeout=5)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {READY_TIMEOUT_S} s:\n{_tail(log_path)}")
            time.sleep(1.0)
        timings["ready_s"] = time.monotonic() - t0
        yield base, timings, log_path
    finally:
        _stop(proc)
        print(f"\nmonailabel server timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in its own session), SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _infer_image(base: str, model: str, image_id: str, tmp_path: Path, suffix: str, log_path: Path):
    url = f"{base}/infer/{model}?image={image_id}&output=image"
    try:
        status, body, _ = _request(url, method="POST", timeout=INFER_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        pytest.fail(f"/infer/{model} failed with HTTP {e.code}: {e.read()[:500]!r}\n{_tail(log_path)}")
    assert status == 200
    out = tmp_path / f"{model}{suffix}"
    out.write_bytes(body)
    return out


def _read_nifti(path: Path):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def test_info_lists_models_with_labels(server, studies):
    base, _, _ = server
    status, body, _ = _request(f"{base}/info/")
    info = json.loads(body)
    models = info["models"]
    assert models["lesion_asegnet"]["labels"] == {"lesion": 1}
    assert models["lesion_asegnet"]["type"] == "segmentation"
    assert models["lung"]["labels"] == {"lung": 1}
    assert models["covid_resnextplus"]["type"] == "classification"
    assert set(models["covid_resnextplus"]["labels"]) == {"non-COVID-19", "COVID-19"}
    assert models.get("cxr_infection", {}).get("labels", {"infection": 1}) == {"infection": 1}
    assert ("cxr_infection" in models) == CXR_BUNDLE.is_file()
    assert "lesion" in info["labels"] and "lung" in info["labels"]
    assert "COVID-19" not in info["labels"]  # class names are not segment names
    n_studies = 2 if (studies / f"{CXR_ID}.png").exists() else 1
    assert info["datastore"]["total"] == n_studies
    _, body, _ = _request(f"{base}/datastore/?output=all")
    assert CT_ID in json.loads(body)["objects"]


def test_lesion_and_lung_masks(server, studies, tmp_path):
    import SimpleITK as sitk

    base, timings, log_path = server
    ref = sitk.ReadImage(str(studies / f"{CT_ID}.nii.gz"))
    t = time.monotonic()
    lesion_path = _infer_image(base, "lesion_asegnet", CT_ID, tmp_path, ".nii.gz", log_path)
    timings["first_infer_lesion_s"] = time.monotonic() - t
    lung_path = _infer_image(base, "lung", CT_ID, tmp_path, ".nii.gz", log_path)
    lesion_img, lesion = _read_nifti(lesion_path)
    lung_img, lung = _read_nifti(lung_path)
    for img, arr in ((lesion_img, lesion), (lung_img, lung)):
        assert img.GetSize() == ref.GetSize()
        assert np.allclose(img.GetSpacing(), ref.GetSpacing()) and np.allclose(img.GetOrigin(), ref.GetOrigin())
        assert np.allclose(img.GetDirection(), ref.GetDirection())
        assert set(np.unique(arr).tolist()) <= {0, 1}
    # real lungs: 5-60 % of a chest CT's voxels; the sample's slices are marked infected by the radiologists
    assert 0.05 < lung.mean() < 0.6
    assert lesion.sum() > 0
    assert not (lesion.astype(bool) & ~lung.astype(bool)).any()  # lesions lie inside the lungs


def test_covid_classification(server):
    base, timings, _ = server
    t = time.monotonic()
    status, body, ctype = _request(f"{base}/infer/covid_resnextplus?image={CT_ID}&output=json", "POST", INFER_TIMEOUT_S)
    timings["infer_classification_s"] = time.monotonic() - t
    res = json.loads(body)
    p = res["covid_probability"]
    assert 0.0 <= p <= 1.0
    scores = {d["label"]: d["score"] for d in res["prediction"]}
    assert scores["COVID-19"] == pytest.approx(p, abs=1e-5)
    assert scores["COVID-19"] + scores["non-COVID-19"] == pytest.approx(1.0, abs=1e-5)
    assert res["covid_detected"] == (p >= res["volume_threshold"])
    assert len(res["slice_scores"]) == 30 and all(0.0 <= s <= 1.0 for s in res["slice_scores"])


def test_cxr_infection(server, shared_data, studies, tmp_path):
    if not CXR_BUNDLE.is_file():
        pytest.skip(f"{CXR_BUNDLE} not present")
    from PIL import Image

    base, timings, log_path = server
    t = time.monotonic()
    mask_path = _infer_image(base, "cxr_infection", CXR_ID, tmp_path, ".png", log_path)
    timings["infer_cxr_s"] = time.monotonic() - t
    with Image.open(studies / f"{CXR_ID}.png") as im:
        size = im.size
    with Image.open(mask_path) as im:
        assert im.size == size
        mask = np.asarray(im)
    assert set(np.unique(mask).tolist()) <= {0, 1}
    _, body, _ = _request(f"{base}/infer/cxr_infection?image={CXR_ID}&output=json", "POST", INFER_TIMEOUT_S)
    res = json.loads(body)
    assert 0.0 <= res["covid_probability"] <= 1.0
    from monai_covid.cxr_detector import bundle_detector

    # the bundle's detector (calibrated map classifier when models/detector.json ships, else the paper's rule)
    assert res["covid_detector"] == bundle_detector(CXR_BUNDLE.parents[1]).rule
    assert res["covid_detected"] == (res["covid_probability"] >= res["covid_threshold"])
    assert res["infected_area_percent"] == pytest.approx(100.0 * mask.mean(), abs=0.01)
    # the same call as the core's predict_cxr (whose detector may also read the encoder's pooled features: the
    # server must hand it the embedding of its own forward pass)
    from monai_covid.inference.lesion import load_bundle_network
    from monai_covid.infection_map import predict_cxr, read_xray

    bundle = CXR_BUNDLE.parents[1]
    want = predict_cxr(
        load_bundle_network(bundle, "cpu"), read_xray(studies / f"{CXR_ID}.png"), detector=bundle_detector(bundle)
    )
    assert res["covid_probability"] == pytest.approx(want["covid_probability"], abs=0.02)
