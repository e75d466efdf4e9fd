"""Near-duplicate grouping of 2D images that carry no patient ids, and grouped k-fold splits.

Slices of one CT (or X-rays of one patient) look alike: same body outline, same scanner field of view, same window.
When a data set gives no patient ids (e.g. the SARS-CoV-2 CT-scan set in ``ct_slices_cls``), a random split puts
neighbouring slices of one patient on both sides and the validation figures measure memory, not generalisation.
This module recovers groups of look-alike images so that a split keeps each group on one side:

- :func:`thumbnail`: a 64 x 64 grey thumbnail (first channel, the whole image squeezed to a square: the
  body outline and its aspect ratio are what the slices of one scan share).
- :func:`pair_scores`: the normalised cross-correlation (Pearson r of the thumbnails' pixels) of every pair,
  and optionally the similarity of a 64-bit DCT perceptual hash (1 - Hamming distance / 64).
- :func:`group_near_duplicates`: union-find over the pairs whose score is at least ``threshold`` (single
  linkage: chains of similar slices of one scan join one group).
- :func:`grouped_folds`: ``k`` folds with no group in two folds, classes balanced as far as the groups allow.

The threshold is a data decision; ``docs/README.md`` of the CT-Net bundle shows how it was chosen from the score
distributions (pairs within one patient vs pairs of different patients in UCSD COVID-CT, which has ids, and the
nearest-neighbour scores of the SARS-CoV-2 set).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "thumbnail",
    "thumbnails",
    "ncc_matrix",
    "phash",
    "phash_similarity",
    "pair_scores",
    "UnionFind",
    "group_near_duplicates",
    "grouped_folds",
    "describe_groups",
    "DEFAULT_NCC_THRESHOLD",
]

#: NCC of 64x64 thumbnails above which two SARS-CoV-2 CT slices are put in one group (see the CT-Net docs).
DEFAULT_NCC_THRESHOLD = 0.85


def thumbnail(image: np.ndarray | str | os.PathLike, size: int = 64) -> np.ndarray:
    """``size x size`` float32 grey thumbnail in ``[0, 1]`` of an image array ``(H, W[, C])`` or file.

    Colour images give their first channel (the CT sets store grey in R=G=B); the whole frame is resized with
    area averaging (PIL ``BOX``), so aspect ratio differences show up as different shapes.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as img:
            arr = np.asarray(img.convert("L") if img.mode not in ("RGB", "RGBA", "L", "LA") else img)
    else:
        arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {arr.shape}")
    arr = arr.astype(np.float32)
    hi = float(arr.max()) if arr.size else 0.0
    arr = arr / 255.0 if hi > 1.0 else arr
    img = Image.fromarray(arr, mode="F").resize((size, size), resample=Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32)


def thumbnails(paths: Sequence[str | os.PathLike], size: int = 64) -> np.ndarray:
    """``N x size x size`` thumbnails of ``paths``."""
    return np.stack([thumbnail(p, size) for p in paths]) if len(paths) else np.zeros((0, size, size), np.float32)


def ncc_matrix(thumbs: np.ndarray) -> np.ndarray:
    """``N x N`` normalised cross-correlation (zero-shift Pearson r) of ``N x h x w`` thumbnails, in ``[-1, 1]``.

    A constant thumbnail has correlation 0 with everything (and 1 with itself).
    """
    x = thumbs.reshape(len(thumbs), -1).astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    r = np.clip(x @ x.T, -1.0, 1.0)
    np.fill_diagonal(r, 1.0)
    return r


def phash(thumb: np.ndarray, hash_size: int = 8) -> np.ndarray:
    """64-bit DCT perceptual hash of a thumbnail: signs of the low-frequency DCT block against its median."""
    from scipy.fft import dctn

    coeffs = dctn(np.asarray(thumb, dtype=np.float64), norm="ortho")[:hash_size, :hash_size].ravel()
    return coeffs[1:] > np.median(coeffs[1:])  # the DC term carries only brightness


def phash_similarity(thumbs: np.ndarray, hash_size: int = 8) -> np.ndarray:
    """``N x N`` share of equal perceptual-hash bits (1 = identical hashes, about 0.5 = unrelated)."""
    h = np.stack([phash(t, hash_size) for t in thumbs]).astype(np.float64) if len(thumbs) else np.zeros((0, 1))
    equal = h @ h.T + (1 - h) @ (1 - h).T
    return equal / max(h.shape[1], 1)


def pair_scores(thumbs: np.ndarray, method: str = "ncc") -> np.ndarray:
    """``N x N`` similarity: ``"ncc"``, ``"phash"`` or ``"min"`` (both must agree: the smaller of the two)."""
    if method == "ncc":
        return ncc_matrix(thumbs)
    if method == "phash":
        return phash_similarity(thumbs)
    if method == "min":
        return np.minimum(ncc_matrix(thumbs), phash_similarity(thumbs))
    raise ValueError(f"unknown method {method!r}; choose 'ncc', 'phash' or 'min'")


class UnionFind:
    """Disjoint sets over ``0 .. n-1`` (path halving, union by size)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]

    def labels(self) -> list[int]:
        """Group index of each element, numbered 0, 1, ... in order of first appearance."""
        ids: dict[int, int] = {}
        return [ids.setdefault(self.find(i), len(ids)) for i in range(len(self.parent))]


def group_near_duplicates(scores: np.ndarray, threshold: float = DEFAULT_NCC_THRESHOLD) -> list[int]:
    """Group index of each item: items joined (transitively) by a pair score ``>= threshold`` share a group."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square matrix, got shape {scores.shape}")
    uf = UnionFind(len(scores))
    ii, jj = np.nonzero(np.triu(scores >= threshold, k=1))
    for i, j in zip(ii.tolist(), jj.tolist()):
        uf.union(i, j)
    return uf.labels()


def grouped_folds(
    groups: Sequence[Hashable], labels: Sequence[Hashable], n_folds: int = 5, seed: str = "grouped"
) -> list[int]:
    """Fold index of each item: every group in exactly one fold, each class spread evenly over the folds.

    Groups are placed largest first (ties in a fixed hash order of ``seed`` and the group id, so the result
    depends only on the data) into the fold where the group's majority class is currently smallest, with the
    fold's total size as tie-breaker: a greedy version of scikit-learn's ``StratifiedGroupKFold``.
    """
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if len(members) < n_folds:
        raise ValueError(f"{len(members)} groups cannot fill {n_folds} folds")
    classes = sorted({str(c) for c in labels})
    per_fold = np.zeros((n_folds, len(classes)))
    folds = [0] * len(groups)

    def order(g: Hashable) -> tuple[int, str]:
        return (-len(members[g]), hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())

    for g in sorted(members, key=order):
        counts = np.zeros(len(classes))
        for i in members[g]:
            counts[classes.index(str(labels[i]))] += 1
        # the fold that leaves every class most evenly spread over the folds (summed spread of the class counts)
        def cost(f: int) -> float:
            after = per_fold.copy()
            after[f] += counts
            return float(after.std(axis=0).sum())

        best = min(range(n_folds), key=lambda f: (round(cost(f), 9), per_fold[f].sum(), f))
        per_fold[best] += counts
        for i in members[g]:
            folds[i] = best
    return folds


def describe_groups(groups: Sequence[int], labels: Sequence[Any] | None = None) -> dict[str, Any]:
    """Counts for a report: number of groups, singletons, largest group, groups holding more than one class."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    sizes = sorted((len(m) for m in members.values()), reverse=True)
    out: dict[str, Any] = {
        "items": len(groups),
        "groups": len(members),
        "singletons": sum(s == 1 for s in sizes),
        "largest": sizes[0] if sizes else 0,
        "sizes_top10": sizes[:10],
    }
    if labels is not None:
        out["mixed_class_groups"] = sum(len({str(labels[i]) for i in m}) > 1 for m in members.values())
    return out
