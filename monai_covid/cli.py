"""``monai-covid`` command line: ``convert``, ``lungmask``, ``infer`` and ``datalist``.

Like TotalSegmentator and lungmask: one verb, input then output, sensible defaults, a progress bar, a one-line
summary at the end, ``--json`` for machine-readable output. Bad input gives a one-line error naming the file and
a non-zero exit, never a traceback. Exit codes: 0 all good, 1 some input failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


def _err(msg: str) -> None:
    from monai_covid.io_utils import display_text

    print(f"monai-covid: error: {display_text(' '.join(str(msg).split()))}", file=sys.stderr)


def _check_output_outside_input(inp: Path, out: Path) -> None:
    """Refuse an output location inside the input tree: nothing in an input folder is ever written to."""
    inp_r, out_r = inp.resolve(), out.resolve()
    base = inp_r if inp_r.is_dir() else inp_r.parent
    if inp_r.is_dir() and (out_r == base or base in out_r.parents):
        raise UsageError(f"output {out} lies inside the input folder {inp}; choose a folder outside it")


def _unique(name: str, used: set[str]) -> str:
    candidate, i = name, 1
    while candidate in used:
        i += 1
        candidate = f"{name}_{i}"
    used.add(candidate)
    return candidate


# ---------------------------------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    import SimpleITK as sitk
    from tqdm import tqdm

    from data_prep.io import InputError, find_dicom_series, read_dicom_series, safe_name
    from monai_covid.io_utils import atomic_save_with, display_text

    inp, out = Path(args.input), Path(args.output)
    if not inp.exists():
        raise InputError(inp, "no such file or folder")
    _check_output_outside_input(inp, out)
    series, errors = find_dicom_series(inp)
    for e in errors:
        _err(e)
    if not series:
        if not errors:
            _err(InputError(inp, "no DICOM image series found"))
        return EXIT_FAILED
    root = inp if inp.is_dir() else inp.parent
    used: set[str] = set()
    ok, failed, results = 0, len(errors), []
    t0 = time.perf_counter()
    for s in tqdm(series, desc="convert", unit="series", disable=args.quiet or len(series) < 2):
        rel = os.path.relpath(s.folder, root)
        base = safe_name(rel if rel != "." else root.resolve().name, fallback="series")
        if sum(x.folder == s.folder for x in series) > 1:
            base = safe_name(f"{base}_series{s.headers[0].get('SeriesNumber', '') or len(used) + 1}")  # a tag: sanitised
        name = _unique(base, used)
        t = time.perf_counter()
        try:
            vol = read_dicom_series(s)
            img = vol.image
            if img.GetPixelID() != sitk.sitkInt16:
                arr = sitk.GetArrayFromImage(img)
                if arr.min() < -32768 or arr.max() > 32767:
                    raise InputError(s.folder, "HU values outside the int16 range")
                img = sitk.Cast(sitk.Round(img) if arr.dtype.kind == "f" else img, sitk.sitkInt16)
            path = out / f"{name}.nii.gz"
            atomic_save_with(path, lambda tmp: sitk.WriteImage(img, tmp, useCompression=True))
        except InputError as e:
            failed += 1
            _err(e)
            continue
        ok += 1
        results.append({"series": display_text(rel), "output": display_text(path), "shape_zyx": list(vol.array.shape),
                        "spacing_zyx": list(vol.spacing), "seconds": round(time.perf_counter() - t, 2)})
    if args.json:
        print(json.dumps({"converted": results, "failed": failed}, indent=2))
    elif not args.quiet:
        print(f"converted {ok} series, {failed} failed, to {display_text(out)} in {time.perf_counter() - t0:.1f} s")
    return EXIT_OK if failed == 0 else EXIT_FAILED


# ---------------------------------------------------------------------------------------------------- lungmask
def cmd_lungmask(args: argparse.Namespace) -> int:
    from data_prep.io import InputError, read_volume, write_like
    from data_prep.lung import lung_mask, lung_volume_ml

    inp, out = Path(args.input), Path(args.output)
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise UsageError(f"output {out} must end in .nii.gz or .nii")
    if not inp.exists():
        raise InputError(inp, "no such file or folder")
    _check_output_outside_input(inp, out)
    t0 = time.perf_counter()
    vol = read_volume(inp)
    mask = lung_mask(vol.array, vol.spacing)
    write_like(mask.astype("uint8"), vol, out)
    volume_ml = lung_volume_ml(mask, vol.spacing)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"input": str(inp), "output": str(out), "lung_volume_ml": round(volume_ml, 1),
                          "n_slices": vol.n_slices, "seconds": round(seconds, 2)}))
    else:
        print(f"lung volume {volume_ml:.0f} mL ({vol.n_slices} slices) -> {out} in {seconds:.1f} s")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- datalist
def cmd_datalist(args: argparse.Namespace) -> int:
    from data_prep.datalists import make_datalist, write_datalist

    items = make_datalist(args.name, args.data_dir, n_folds=args.folds)
    write_datalist(items, args.output)
    print(f"{args.output}: {len(items)} items in {len({d['fold'] for d in items})} folds")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- infer
def cmd_infer(args: argparse.Namespace) -> int:
    import signal

    from monai_covid.batch import install_signal_handlers, run_batch

    previous = install_signal_handlers()  # SIGINT/SIGTERM: staging files removed, one line, exit 130/143
    try:
        return run_batch(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _add_infer(sub) -> None:
    p = sub.add_parser(
        "infer",
        help="batch inference over a folder of DICOM/NIfTI studies (lesions, lung, COVID probability, report)",
        description="Run the CT (and chest X-ray) models over every case under INPUT and write per-case results, "
        "report.csv and report.html to OUTPUT. Nothing is written inside INPUT.",
    )
    p.add_argument("input", help="folder (searched recursively) or a single NIfTI file / DICOM series folder")
    p.add_argument("output", help="output folder (created; must not lie inside INPUT)")
    p.add_argument("--models", nargs="+", default=None,
                   help="models to run: asegnet (default lesion model), cosup (alternative lesion model), "
                   "resnextplus (CT volume COVID detector), cxr (X-ray infection map), ctnet (CT slice COVID classifier "
                   "with Grad-CAM, 2D images with --modality ct); default: all that are installed")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--overwrite", action="store_true", help="recompute cases that already have a complete result")
    p.add_argument("--modality", choices=("ct", "cxr"), default=None,
                   help="what 2D png/jpg images under INPUT are (they are ignored without it)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    p.add_argument("--no-dicom-seg", action="store_true", help="skip writing the DICOM SEG object")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_infer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-covid", description="COVID-19 CT and chest X-ray models on MONAI.")
    from monai_covid import __version__

    parser.add_argument("--version", action="version", version=f"monai-covid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("convert", help="every DICOM series under IN -> OUT/<name>.nii.gz (int16 HU)",
                       description="Convert every DICOM series under IN to OUT/<name>.nii.gz (int16 HU, geometry as "
                       "SimpleITK reads it). <name> comes from the series folder relative to IN.")
    p.add_argument("input", help="folder searched recursively for DICOM series")
    p.add_argument("output", help="output folder")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("lungmask", help="lung mask of a CT (NIfTI or DICOM series folder) and its volume in mL",
                       description="Threshold lung mask (-600 HU, convex hull, dilation) written in the input's geometry.")
    p.add_argument("input", help="NIfTI file or DICOM series folder")
    p.add_argument("output", help="output mask, .nii.gz")
    p.add_argument("--json", action="store_true", help="print a JSON line with lung_volume_ml")
    p.set_defaults(func=cmd_lungmask)

    _add_infer(sub)

    p = sub.add_parser("datalist", help="write a MONAI datalist JSON with k folds for one of the shared data sets")
    p.add_argument("name", choices=("ct_lesion_slices", "cxr_infection", "ct_slices_cls", "ct_dicom"))
    p.add_argument("data_dir", help="folder holding the data sets (e.g. ../shared/data)")
    p.add_argument("output", help="datalist JSON to write")
    p.add_argument("--folds", type=int, default=5)
    p.set_defaults(func=cmd_datalist)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from data_prep.io import InputError

    for stream in (sys.stdout, sys.stderr):  # a console that cannot show a character must not stop a batch
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass
    import pydicom

    # header values a reader does not need to be valid (a UUID in a UID) are checked where they matter (DICOM SEG);
    # pydicom's per-value warnings would only flood stderr
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        _err(e)
        return EXIT_USAGE
    except InputError as e:
        _err(e)
        return EXIT_FAILED
    except KeyboardInterrupt as e:
        import signal

        signum = getattr(e, "signum", signal.SIGINT)
        print(f"monai-covid: interrupted by {signal.Signals(signum).name}; finished cases are kept, run the same "
              "command again to resume", file=sys.stderr)
        return 128 + signum
    except (OSError, ValueError, RuntimeError) as e:
        _err(f"{type(e).__name__}: {e}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
