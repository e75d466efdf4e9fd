"""Atomic output writers: a killed run never leaves a half-written file behind.

Every writer stages its bytes in a temporary file in the destination folder and renames it into place
(``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_csv",
    "atomic_save_png",
    "atomic_save_figure",
    "atomic_save_with",
    "save_fp16",
    "display_text",
    "csv_safe_cell",
]


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save_with(path: str | os.PathLike, writer, suffix: str | None = None) -> Path:
    """Call ``writer(tmp_path)`` for libraries that write by file name (SimpleITK, pydicom), then rename.

    ``suffix`` defaults to the destination's full suffix (``.nii.gz`` kept whole) so that writers which pick a
    format from the file name still do. A destination whose path SimpleITK cannot take (not valid UTF-8, as an
    OUTPUT folder named in Latin-1 is) is staged in the system temporary folder and then copied into place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    if not _utf8_encodable(str(path.parent)):
        with tempfile.TemporaryDirectory(prefix="monai-covid-") as scratch:
            tmp = os.path.join(scratch, f"out{suffix}")
            writer(tmp)
            with open(tmp, "rb") as f:
                return atomic_write_bytes(path, f.read())
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_write_csv(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str], safe_cells: bool = False
) -> Path:
    """CSV with RFC 4180 quoting. ``safe_cells``: every text cell goes through :func:`csv_safe_cell` (for tables
    whose cells hold names and messages from untrusted input, such as the batch report)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore", lineterminator="\n",
                            quoting=csv.QUOTE_MINIMAL)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_safe_cell(v) for k, v in row.items()} if safe_cells else row)
    return atomic_write_text(path, buf.getvalue())


# C0/C1 controls (ESC of ANSI sequences, CR, LF, TAB, ...), line/paragraph separators and bidi overrides: they can
# break a one-line message or a CSV row, or make a name display as something else.
_UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match) -> str:
    c = m.group()
    if c in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[c]
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display_text(value: Any) -> str:
    """``value`` as one printable line, for messages, reports and logs; never for opening a file.

    File names come from the OS as ``str`` with undecodable bytes held as surrogates (``os.fsdecode``,
    surrogateescape): such bytes are shown as ``\\xe9``; control characters (newline, carriage return, the ESC of
    ANSI sequences, ...) as ``\\n``, ``\\r``, ``\\x1b``. The path used to read the file stays untouched.
    """
    if isinstance(value, bytes):
        text = value.decode("utf-8", "backslashreplace")
    else:
        text = str(value)
        if not _utf8_encodable(text):
            try:
                text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:  # lone surrogates that did not come from surrogateescape
                text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _UNSAFE_CHARS.sub(_escape_char, text)


def csv_safe_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: one printable line (:func:`display_text`), and a leading
    ``=``, ``+``, ``-``, ``@`` (a formula to Excel, LibreOffice, Sheets) prefixed with ``'`` (OWASP CSV injection).
    Numbers and ``None`` pass unchanged."""
    if value is None or isinstance(value, (bool, int, float, np.integer, np.floating)):
        return value
    text = display_text(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def atomic_save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save a uint8 (H, W), (H, W, 3) or (H, W, 4) array as PNG."""
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"atomic_save_png expects uint8, got {array.dtype} for {path}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_figure(fig, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Render a matplotlib figure as PNG (``savefig_kwargs``: e.g. ``dpi``, ``bbox_inches``), close it and write it
    atomically."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_fp16(state: Any, path: str | os.PathLike) -> Path:
    """Write a state_dict with its floating tensors in fp16 (how the bundles ship weights), atomically.

    ``state``: a state_dict, a module (a ``DistributedDataParallel``/``DataParallel`` wrapper is unwrapped) or the
    path of a saved state_dict (read with ``weights_only=True``; ``path`` may be that same file).
    """
    import torch

    if isinstance(state, (str, os.PathLike)):
        state = torch.load(state, map_location="cpu", weights_only=True)
    elif isinstance(state, torch.nn.Module):
        wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
        state = (state.module if isinstance(state, wrappers) else state).state_dict()
    state = {k: v.detach().cpu().half() if torch.is_floating_point(v) else v for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())
