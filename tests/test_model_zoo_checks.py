"""The MONAI model zoo's CI checks, run offline on every bundle (our own implementation of its rules).

Rules read from Project-MONAI/model-zoo: ``ci/verify_bundle.py`` (necessary and preferred files, version and
changelog, metadata against its schema, ``verify_net_in_out``, TorchScript export with ``ckpt_export``),
``ci/get_bundle_requirements.py`` (what CI installs: ``monai_version``, ``pytorch_version``, ``numpy_version`` and the
``optional_packages_version`` / ``required_packages_version`` pins), ``ci/utils.py`` (``large_files.yml``: path, url,
hash), ``CONTRIBUTING.md`` ("License Format": ``LICENSE`` + ``docs/data_license.txt``; "Model storage": 25 MB a file;
"Preferred Files and Keys": the config keys; "Code format tests": black, isort, flake8) and
``docs/readme_template.md`` (README sections). Differences, on purpose: no download (the weights ship in the repo, so
``large_files.yml`` points at them and its hashes are checked), the schema is the vendored copy in ``schemas/``, and
the TorchScript check goes further than the zoo's (the exported model must give the state-dict model's outputs on a
real image, max abs diff <= 1e-4 in fp32).

``test_copied_bundle_runs_with_only_the_wheel`` builds the wheel and runs copied bundles in a venv that sees the
installed dependencies but not this checkout: first without the wheel (a one-line message naming what to install),
then with it (real inference).

After retraining, refresh the weights' hashes with ``python tests/test_model_zoo_checks.py --write-large-files``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
SHARED = REPO.parent / "shared"
MAX_FILE_BYTES = 25 * 1024 * 1024  # the zoo's limit for one file (CONTRIBUTING "Model storage")
CONFIG_EXTS = ("json", "yaml", "yml")
# (name of the rule, headings that satisfy it: a heading matches when its text starts with one of them)
README_SECTIONS = {
    "model overview": ("model overview", "model description", "model", "what the model does"),
    "data": ("data",),
    "performance": ("performance", "results"),
    "MONAI bundle commands": ("monai bundle commands",),
    "system configuration": ("system configuration",),
    "limitations": ("limitations",),
    "references": ("references",),
    "license": ("license",),
}
# the data sets in ../shared/data a bundle may name (configs, docs, scripts)
DATA_SETS = ("ct_lesion_slices", "ct_slices_cls", "ct_slices_ucsd", "ct_dicom", "cxr_infection")


def _ids(bundle: Path) -> str:
    return bundle.name


def _meta(bundle: Path) -> dict:
    return json.loads((bundle / "configs" / "metadata.json").read_text())


def _find_config(bundle: Path, name: str) -> Path | None:
    for ext in CONFIG_EXTS:
        if (bundle / "configs" / f"{name}.{ext}").is_file():
            return bundle / "configs" / f"{name}.{ext}"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _weight_files(bundle: Path) -> list[Path]:
    return sorted(p for p in (bundle / "models").glob("*") if p.suffix in (".pt", ".ts", ".onnx", ".pth"))


def write_large_files(bundle: Path) -> Path:
    """(Re)write ``bundle/large_files.yml`` for the weights that ship in ``bundle/models``."""
    lines = [
        "# Weights of this bundle, in the model zoo's large_files format (path, url, hash_val, hash_type).",
        "# They ship with the bundle in the monai-covid repository, so 'url' names that place instead of a download;",
        "# monai.apps.download_url skips a download when the file is there with this hash. After retraining run:",
        "#   python tests/test_model_zoo_checks.py --write-large-files",
        "large_files:",
    ]
    for path in _weight_files(bundle):
        rel = path.relative_to(bundle).as_posix()
        lines += [
            f'  - path: "{rel}"',
            f'    url: "shipped in the monai-covid repository: bundles/{bundle.name}/{rel}"',
            f'    hash_val: "{_sha256(path)}"',
            '    hash_type: "sha256"',
        ]
    out = bundle / "large_files.yml"
    out.write_text("\n".join(lines) + "\n")
    return out


# ------------------------------------------------------------------------------------------------ files and metadata
def test_all_five_bundles_checked():
    assert {b.name for b in BUNDLES} >= {
        "covid_ct_lesion_asegnet",
        "covid_ct_lesion_cosup_resunet",
        "covid_ct_slice_ctnet",
        "covid_ct_volume_resnextplus",
        "covid_cxr_infection_map_unet",
    }


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_necessary_and_preferred_files(bundle):
    # verify_bundle_directory: necessary LICENSE + configs/metadata.json, preferred models/model.pt + inference config
    assert (bundle / "LICENSE").is_file() and (bundle / "configs" / "metadata.json").is_file()
    assert (bundle / "models" / "model.pt").is_file()
    assert _find_config(bundle, "inference") is not None
    # CONTRIBUTING "License Format" and the readme template
    assert (bundle / "docs" / "README.md").is_file() and (bundle / "docs" / "data_license.txt").is_file()
    # "Model storage": no single file over 25 MB
    big = [str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file() and p.stat().st_size > MAX_FILE_BYTES]
    assert not big, f"files over 25 MB: {big}"


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_version_and_changelog(bundle):
    meta = _meta(bundle)
    version = meta["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert version in meta["changelog"], f"version {version} has no changelog entry"
    newest = max(meta["changelog"], key=lambda v: tuple(int(x) for x in v.split(".")))
    assert newest == version, f"changelog has {newest}, newer than version {version}"


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_metadata_against_vendored_schema(bundle, tmp_path):
    from monai.bundle import verify_metadata

    meta = _meta(bundle)
    vendored = REPO / "schemas" / meta["schema"].rsplit("/", 1)[-1]
    assert vendored.is_file(), f"schema {meta['schema']} is not vendored in schemas/"
    if (SHARED / "schemas" / vendored.name).is_file():
        assert vendored.read_bytes() == (SHARED / "schemas" / vendored.name).read_bytes()
    schema = tmp_path / "schema.json"  # a copy: verify_metadata would download into a missing path
    shutil.copy(vendored, schema)
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))
    assert meta.get("name") and meta.get("task") and meta.get("authors")  # the display name the model browser shows


# ------------------------------------------------------------------------------------------------------- requirements
def _requirements(meta: dict) -> dict[str, str]:
    """What the zoo's get_bundle_requirements.py pins for this bundle, as {distribution: version}."""
    reqs = {}
    for key, dist in (("monai_version", "monai"), ("pytorch_version", "torch"), ("numpy_version", "numpy")):
        if key in meta:
            reqs[dist] = meta[key]
    for key in ("optional_packages_version", "required_packages_version"):
        reqs.update(meta.get(key, {}))
    return reqs


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _config_modules(bundle: Path) -> set[str]:
    """Top-level modules the bundle's configs import or instantiate (``$import x``, ``from x``, dotted ``_target_``)."""
    mods: set[str] = set()
    for cfg in (bundle / "configs").glob("*.json"):
        if cfg.name == "metadata.json":
            continue

        def walk(node):
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "_target_" and isinstance(v, str) and "." in v and not v.startswith(("$", "@")):
                        mods.add(v.split(".")[0])
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)
            elif isinstance(node, str) and node.startswith("$"):
                mods.update(re.findall(r"(?:^\$|;)\s*import\s+(\w+)", node))
                mods.update(re.findall(r"(?:^\$|;)\s*from\s+(\w+)", node))

        walk(json.loads(cfg.read_text()))
    return mods


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_requirements_cover_what_the_configs_import(bundle):
    """The zoo's CI installs only the metadata's pins: every module the configs import must come with one of them."""
    reqs = {_norm(n) for n in _requirements(_meta(bundle))}
    assert "monai-covid" in reqs, "metadata must name the monai-covid package (configs reference its code)"
    provided_by = metadata.packages_distributions()
    missing = {}
    for mod in sorted(_config_modules(bundle)):
        if mod in sys.stdlib_module_names:
            continue
        dists = {_norm(d) for d in provided_by.get(mod, [])}
        if mod in ("monai_covid", "data_prep"):  # this project's packages (an editable install maps them lazily)
            dists.add("monai-covid")
        if not dists & reqs:
            missing[mod] = sorted(dists) or "not installed"
    assert not missing, f"config imports not covered by the metadata's requirements: {missing}"


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_requirement_pins_are_the_tested_versions(bundle):
    """The versions the zoo's CI would install are the ones this test suite runs with (monai-covid: __version__)."""
    import monai_covid

    wrong = {}
    for name, pinned in _requirements(_meta(bundle)).items():
        if _norm(name) == "monai-covid":
            installed = monai_covid.__version__
        else:
            installed = metadata.version(name).split("+")[0]
        if installed != pinned:
            wrong[name] = f"metadata {pinned}, tested {installed}"
    assert not wrong, wrong


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_every_entry_config_checks_the_package_first(bundle):
    """``python -m monai.bundle run`` runs ``initialize`` first; its first item stops a run without monai-covid."""
    from monai.bundle import ConfigParser

    combos = [["inference"], ["train"], ["train", "evaluate"], ["train", "multi_gpu_train"]]
    for combo in combos:
        files = [_find_config(bundle, c) for c in combo]
        if any(f is None for f in files):
            continue
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        parser.read_meta(str(bundle / "configs" / "metadata.json"))
        assert parser["initialize"][0] == "$@check_requirements", f"{combo}: initialize does not start with the check"
        assert parser.get_parsed_content("check_requirements") is None  # this checkout's package satisfies it
    for cfg in sorted((bundle / "configs").glob("*.json")):  # any other config that replaces initialize
        init = json.loads(cfg.read_text()).get("initialize")
        if cfg.name != "metadata.json" and init is not None:
            assert init[:1] == ["$@check_requirements"], f"{cfg.name}: initialize does not start with the check"


def test_requirement_check_message(tmp_path):
    """With another monai-covid version required, the check exits with one line naming what to install."""
    from monai.bundle import ConfigParser

    bundle = REPO / "bundles" / "covid_ct_lesion_asegnet"
    meta = _meta(bundle)
    meta["required_packages_version"]["monai-covid"] = "99.0.0"
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(tmp_path / "metadata.json"))
    with pytest.raises(SystemExit) as exc:
        parser.get_parsed_content("check_requirements")
    message = str(exc.value.code)
    import monai_covid

    assert "\n" not in message
    assert "version 99.0.0" in message and f"(installed: {monai_covid.__version__})" in message
    assert "pip install monai_covid-99.0.0-py3-none-any.whl" in message


# --------------------------------------------------------------------------------------- config keys, docs, licences
@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_contributing_config_keys(bundle):
    """CONTRIBUTING "Preferred Files and Keys"."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(_find_config(bundle, "inference")))
    missing = [k for k in ("bundle_root", "device", "network_def", "inferer", "output_dir") if k not in parser]
    assert not missing, f"inference config lacks {missing}"
    train_file = _find_config(bundle, "train")
    if train_file is None:
        return
    parser = ConfigParser()
    parser.read_config(str(train_file))
    keys = ["bundle_root", "device", "dataset_dir", "output_dir"]
    if "train" in parser:
        keys += ["train#trainer", "train#trainer#max_epochs", "train#dataset", "train#dataset#data", "train#handlers"]
    if "validate" in parser:
        keys += ["validate#evaluator", "validate#handlers", "validate#dataset", "validate#dataset#data"]
    if "ValidationHandler" in train_file.read_text():
        keys.append("val_interval")
    missing = [k for k in keys if k not in parser]
    assert not missing, f"train config lacks {missing}"


def _supervised_train(bundle: Path) -> bool:
    """A ``train.json`` built on MONAI's ``SupervisedTrainer`` (``train#trainer``). ResNeXt+'s is not: its ``trainer``
    is one call of ``monai_covid.volume_mil.fit_and_save`` (MIL bags), so MONAI's train-workflow properties do not
    describe it."""
    return '"SupervisedTrainer"' in (bundle / "configs" / "train.json").read_text()


@pytest.mark.parametrize("bundle", [b for b in BUNDLES if _supervised_train(b)], ids=_ids)
def test_train_properties_strict(bundle):
    """MONAI's strict train-workflow check (``ConfigWorkflow(workflow_type="train").check_properties``) on the
    config ids, without instantiating the trainer (that would cache the whole data set): every required
    ``TrainProperties`` id is in ``train.json``, and every optional one that is referenced is referenced as MONAI
    expects, e.g. the ``ValidationHandler`` interval is exactly ``@val_interval``."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle.properties import TrainProperties
    from monai.utils import BundleProperty, BundlePropertyConfig

    wf = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type="train",
        logging_file=False,
    )
    wf.parser.parse(reset=True)  # what initialize() does to the ids (normalised separators), without running anything
    missing = [
        n
        for n, p in TrainProperties.items()
        if p[BundleProperty.REQUIRED] and p[BundlePropertyConfig.ID] not in wf.parser
    ]
    assert not missing, f"required train properties missing: {missing}"
    wrong = [
        n for n, p in TrainProperties.items() if not p[BundleProperty.REQUIRED] and not wf._check_optional_id(n, p)
    ]
    assert not wrong, f"optional train properties referenced under other ids: {wrong}"


# an input folder of each bundle's data: the inference configs stop with a one-line error on a missing input folder
# (the CXR and ResNeXt+ defaults, /workspace/data/..., do not exist here), so the property check gets a real one
INFERENCE_INPUTS = {
    "covid_ct_lesion_asegnet": "ct_lesion_slices/train/images",
    "covid_ct_lesion_cosup_resunet": "ct_lesion_slices/train/images",
    "covid_ct_slice_ctnet": "ct_slices_cls",
    "covid_ct_volume_resnextplus": "ct_dicom",
    "covid_cxr_infection_map_unet": "cxr_infection/train/covid/images",
}


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_inference_properties(bundle, tmp_path, shared_data):
    """The zoo's verify_bundle_properties for the inference workflow: MONAI's InferProperties (required ones present,
    optional ones under their expected ids). The zoo runs it only for bundles with ``supported_apps``; ours have none,
    so this is stricter than its CI."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=str(_find_config(bundle, "inference")),
        meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type="infer",
        logging_file=False,
        bundle_root=str(bundle),
        dataset_dir=str(shared_data / INFERENCE_INPUTS[bundle.name]),
        output_dir=str(tmp_path),
        device="$torch.device('cpu')",
    )
    wf.initialize()
    assert wf.check_properties() == []


def _headings(readme: Path) -> list[str]:
    out, fenced = [], False
    for line in readme.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            out.append(re.sub(r"[`*]", "", line.lstrip("#")).strip().lower())
    return out


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_readme_sections(bundle):
    """The sections of the zoo's readme template (with this project's names for some of them)."""
    headings = _headings(bundle / "docs" / "README.md")
    missing = [rule for rule, names in README_SECTIONS.items() if not any(h.startswith(names) for h in headings)]
    assert not missing, f"docs/README.md has no section for {missing}"
    text = (bundle / "docs" / "README.md").read_text()
    assert "data_license.txt" in text and "ckpt_export" in text and "monai-covid" in text


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_data_license_names_every_data_set_used(bundle):
    """docs/data_license.txt covers each ../shared/data set the bundle's configs, docs or scripts name, with the
    licence line of that set's README."""
    used = set()
    for path in bundle.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".py") and path.name != "metadata.json":
            used.update(d for d in DATA_SETS if d in path.read_text(errors="ignore"))
    text = (bundle / "docs" / "data_license.txt").read_text()
    for name in sorted(used):
        assert f"License (as stated in ../shared/data/{name}/README.md)" in text, f"{name} is not in data_license.txt"
    assert used, "the bundle names no data set"


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_large_files_declare_the_weights(bundle):
    """large_files.yml as the zoo's download_large_files reads it; every weight file listed with its sha256."""
    from monai.apps.utils import download_url
    from monai.bundle import ConfigParser

    path = bundle / "large_files.yml"
    hint = "run: python tests/test_model_zoo_checks.py --write-large-files"
    assert path.is_file(), f"{path} missing; {hint}"
    parser = ConfigParser()
    parser.read_config(str(path))
    entries = parser.get()["large_files"]
    listed = {e["path"] for e in entries}
    assert listed == {p.relative_to(bundle).as_posix() for p in _weight_files(bundle)}, hint
    for e in entries:
        assert e["hash_type"] == "sha256" and e["url"] and len(e["hash_val"]) == 64
        # the zoo's download step (ci/utils.py download_large_files): a present file with the right hash is kept,
        # a wrong hash raises (and there is no network to download from)
        try:
            download_url(url=e["url"], filepath=str(bundle / e["path"]), hash_val=e["hash_val"], hash_type="sha256")
        except RuntimeError as err:
            pytest.fail(f"{e['path']}: {err}; {hint}")


# -------------------------------------------------------------------------------------------------------- code format
def _precommit_scope() -> re.Pattern:
    import yaml

    cfg = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    return re.compile(cfg["files"])


def _files_in_scope() -> list[str]:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout: walk the bundles and this project's files
        tracked = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts]
    scope = _precommit_scope()
    return [f for f in tracked if scope.search(f) and (REPO / f).is_file()]


def test_precommit_config_is_valid_and_offline():
    import yaml

    cfg = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    assert all(r["repo"] == "local" for r in cfg["repos"]), "hooks must run offline from the project's venv"
    ids = {h["id"] for r in cfg["repos"] for h in r["hooks"]}
    assert {"black", "isort", "flake8", "end-of-file-fixer", "trailing-whitespace", "check-json"} <= ids
    exe = Path(sys.executable).with_name("pre-commit")
    if exe.is_file():
        r = subprocess.run([str(exe), "validate-config", ".pre-commit-config.yaml"], cwd=REPO, capture_output=True)
        assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def test_code_format_of_bundles_and_zoo_files():
    """What the pre-commit hooks check, without fixing anything: final newline, no trailing whitespace, valid JSON,
    and black / isort / flake8 on the Python files (the zoo's "Code format tests")."""
    files = _files_in_scope()
    assert any(f.startswith("bundles/") for f in files)
    problems = []
    for f in files:
        data = (REPO / f).read_bytes()
        if Path(f).suffix in (".png", ".jpg", ".pt", ".ts", ".gz") or b"\0" in data[:4096]:
            continue
        if data and (not data.endswith(b"\n") or data.endswith(b"\n\n")):
            problems.append(f"{f}: must end with exactly one newline")
        bad = [i + 1 for i, line in enumerate(data.split(b"\n")) if line.rstrip(b"\r") != line.rstrip()]
        if bad:
            problems.append(f"{f}: trailing whitespace on lines {bad[:5]}")
        if f.endswith(".json"):
            try:
                json.loads(data)
            except ValueError as e:
                problems.append(f"{f}: {e}")
    py = [f for f in files if f.endswith(".py")]
    for tool in (["black", "--check"], ["isort", "--check-only"], ["flake8"]):
        if not py:
            break
        r = subprocess.run([sys.executable, "-m", *tool, *py], cwd=REPO, capture_output=True, text=True)
        if r.returncode:
            problems.append(f"{tool[0]}: {(r.stdout + r.stderr).strip()}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------ network: shapes and TorchScript export
@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_verify_net_in_out(bundle):
    """The zoo's data-shape check with its defaults (net_id network_def, the inference config)."""
    from monai.bundle import verify_net_in_out

    torch.set_num_threads(1)
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(_find_config(bundle, "inference")),
        bundle_root=str(bundle),
        device="cpu",
    )


def _gray(path: Path, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    t = torch.from_numpy(img)[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)


def _real_input(bundle: Path, data: Path) -> torch.Tensor:
    """A real image of the bundle's data set, shaped as its metadata's network input (value range [0, 1])."""
    spec = _meta(bundle)["network_data_format"]["inputs"]["image"]
    channels, spatial = spec["num_channels"], spec["spatial_shape"]
    two_d = {
        "covid_ct_lesion_asegnet": data / "ct_lesion_slices" / "train" / "images" / "0.jpg",
        "covid_ct_lesion_cosup_resunet": data / "ct_lesion_slices" / "train" / "images" / "1.jpg",
        "covid_ct_slice_ctnet": sorted((data / "ct_slices_cls" / "covid").glob("*.png"))[0],
        "covid_cxr_infection_map_unet": data / "cxr_infection" / "train" / "covid" / "images" / "covid_1.png",
    }
    if bundle.name in two_d:
        assert channels == 1 and len(spatial) == 2
        return _gray(two_d[bundle.name], tuple(spatial))
    if bundle.name == "covid_ct_volume_resnextplus":
        # 8 consecutive slices of the COVID-19 series P001 (lung window to [0, 1]) and a lung mask (HU in [-950, -300])
        from data_prep.io import read_volume

        vol = read_volume(data / "ct_dicom" / "P001")
        hu = torch.as_tensor(np.asarray(vol.array, dtype=np.float32))
        axis = int(np.argmin(hu.shape))  # the slice axis has the fewest voxels (148 vs 512)
        mid = hu.shape[axis] // 2
        hu = hu.movedim(axis, 0)[mid - 4 : mid + 4]
        ct = ((hu + 1000.0) / 1400.0).clamp(0, 1)
        lung = ((hu > -950) & (hu < -300)).float()
        size = [s for s in spatial if s != "*"]
        x = torch.stack([ct, lung])[None]  # (1, 2, 8, H, W)
        x = torch.nn.functional.interpolate(x, size=(8, *size), mode="nearest")
        return x[:, :channels]
    raise AssertionError(f"no real test input defined for {bundle.name}")


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids)
def test_torchscript_export_equals_state_dict_model(bundle, tmp_path, shared_data):
    """``python -m monai.bundle ckpt_export`` (the same function, in process) writes a TorchScript model that loads
    and gives the outputs of the fp32 state-dict model on a real image (max abs diff <= 1e-4)."""
    from monai.bundle import ConfigParser, ckpt_export

    torch.set_num_threads(1)
    config = str(_find_config(bundle, "inference"))
    ts_path = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_path),
        ckpt_file=str(bundle / "models" / "model.pt"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=config,
        bundle_root=str(bundle),
    )
    scripted = torch.jit.load(str(ts_path), map_location="cpu").eval()

    parser = ConfigParser()
    parser.read_config(config)
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def")
    state = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    net = net.float().eval()

    x = _real_input(bundle, shared_data)
    with torch.no_grad():
        expected, got = _tensors(net(x)), _tensors(scripted(x))
    assert len(expected) == len(got) > 0
    for e, g in zip(expected, got):
        assert e.shape == g.shape and e.dtype == g.dtype == torch.float32
        assert (e - g).abs().max().item() <= 1e-4
    assert expected[0].abs().max() > 0  # a real output, not an all-zero tensor


# ---------------------------------------------------------------------------- a copied bundle with only the wheel
def _venv_without_this_checkout(root: Path) -> Path:
    """A fresh venv whose only view of the installed dependencies is a .pth line to this venv's site-packages.

    Site-packages reached through a .pth line do not run their own .pth files, so this checkout's editable install
    of monai-covid is invisible there: the venv has torch, MONAI and the other dependencies, but not monai_covid."""
    import sysconfig

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def _run_bundle(py: Path, bundle: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [str(py), "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json")]
    cmd += ["--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_copied_bundle_runs_with_only_the_wheel(tmp_path, shared_data):
    """Build the wheel (``pip wheel --no-deps``), copy a bundle out of the repo, and run its inference config in a
    venv that lacks this checkout: without the wheel it stops with one line naming the package and version to
    install; with only the wheel installed it runs on real images and writes its outputs."""
    import monai_covid

    src = tmp_path / "src"  # build from a copy: a build writes build/ and egg-info next to the sources
    for pkg in ("monai_covid", "data_prep"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        check=True,
        capture_output=True,
    )
    wheel = wheels / f"monai_covid-{monai_covid.__version__}-py3-none-any.whl"
    assert wheel.is_file(), sorted(p.name for p in wheels.iterdir())

    py = _venv_without_this_checkout(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    probe = subprocess.run([str(py), "-c", "import monai, torch; import monai_covid"], cwd=work, capture_output=True)
    assert probe.returncode != 0 and b"No module named 'monai_covid'" in probe.stderr

    # the A-SegNet bundle: its inference config uses both packages of the wheel (monai_covid and data_prep); the
    # check itself is tested on every bundle and config above, in process
    lesion_in = tmp_path / "lesion_in"
    lesion_in.mkdir()
    shutil.copy(shared_data / "ct_lesion_slices" / "train" / "images" / "0.jpg", lesion_in)
    cases = {"covid_ct_lesion_asegnet": lesion_in}

    copies = {}
    for name in cases:
        copies[name] = work / name
        shutil.copytree(REPO / "bundles" / name, copies[name], ignore=shutil.ignore_patterns("eval", "__pycache__"))

    for name, bundle in copies.items():
        r = _run_bundle(py, bundle, ["--dataset_dir", str(cases[name]), "--output_dir", str(tmp_path / "none")], work)
        assert r.returncode == 1, r.stderr[-2000:]
        lines = [ln for ln in r.stderr.splitlines() if "monai-covid" in ln]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"version {monai_covid.__version__} (installed: none)" in lines[0]
        assert f"pip install monai_covid-{monai_covid.__version__}-py3-none-any.whl" in lines[0]

    pip = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert pip.returncode == 0, pip.stderr
    version = subprocess.run(
        [str(py), "-c", "import monai_covid; print(monai_covid.__version__, monai_covid.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert version[0] == monai_covid.__version__ and str(REPO) not in version[1]

    for name, bundle in copies.items():
        out = tmp_path / f"out_{name}"
        r = _run_bundle(py, bundle, ["--dataset_dir", str(cases[name]), "--output_dir", str(out)], work)
        assert r.returncode == 0, r.stderr[-3000:]
        written = [p for p in out.rglob("*") if p.is_file()]
        assert written, f"{name}: no output in {out}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-large-files"]:
        for b in BUNDLES:
            print(write_large_files(b))
    else:
        sys.exit("usage: python tests/test_model_zoo_checks.py --write-large-files")
