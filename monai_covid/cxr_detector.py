"""COVID-19 detection from a chest X-ray infection-probability map: the paper's rule and a calibrated map classifier.

Degerli et al., "COVID-19 infection map generation and detection from chest X-ray images", Health Inf Sci Syst 9, 15
(2021), section "Infection map generation and COVID-19 detection", call an X-ray COVID-19 when any pixel of the map has
``p >= 0.5`` (:func:`monai_covid.infection_map.covid_detected`). On COVID-QU-Ex that rule also fires on non-COVID
pneumonia (issue 19: specificity 0.515 on a 1,151-image held-out detection set), so the default detector of the v3
bundle is a small logistic classifier on a few numbers read off the map (:func:`map_features`):

- ``max_prob`` — the highest pixel probability (the paper's score);
- ``area`` — the share of the region's pixels with ``p >= 0.5``;
- ``mean_prob`` — the mean probability over the region;
- ``q99_prob`` — the 99th percentile of the probability over the region;
- ``bilateral`` — the smaller of the two ``area`` values of the left and right half of the region (COVID-19
  pneumonia is typically bilateral and peripheral; bacterial pneumonia is often one lobe).

The region is the lung mask when one is given (the data set's lung masks in training) and the whole image otherwise
(the bundle's network predicts no lung mask; the CV driver measures both, :mod:`monai_covid.cxr_cv`).

:class:`CxrDetector` standardises the chosen features (probabilities as logits, areas as ``log(area + 1e-4)``),
fits an L2-regularised logistic regression (IRLS) on **out-of-fold training predictions** only, so its output is the
calibrated ``covid_probability``, and picks its threshold on those same training predictions
(:func:`choose_threshold`: the lowest cut-off whose specificity on *each* negative class is at least
``min_specificity``). ``rule="paper"`` keeps the paper's rule (``covid_probability`` = max p, threshold 0.5).
A detector is stored as a small JSON file (:meth:`CxrDetector.save` / :meth:`CxrDetector.load`).

**Encoder embedding (issue 19, "a classification head on the encoder").** ``CxrDetector.fit(..., embeddings=E)``
adds the first ``n_components`` principal components of the network's global-average-pooled bottleneck features
(``E``: ``(N, C)``, one row per X-ray, PCA fitted on the fitting rows only) as features ``emb_0``, ``emb_1``, ... beside
the map features, so the logistic head reads the encoder too (fitted post hoc on out-of-fold X-rays, the network
unchanged). :func:`find_embedding_layer` names the module whose output is pooled (the widest module that runs at the
network's smallest spatial size: the DenseNet encoder's output in ``InfectionUNet``, the bottom skip block in MONAI's
``UNet``), stored in the detector as ``embedding_layer``; :class:`EmbeddingTap` (a forward hook) collects the pooled
features during the ordinary forward pass of inference, so the map costs nothing extra.

Shapes: probability maps and lung masks are ``(H, W)`` arrays or ``(1, H, W)`` tensors, values in [0, 1].
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_covid.infection_map import _as_2d

__all__ = [
    "FEATURES",
    "DEFAULT_FEATURES",
    "map_features",
    "fit_logistic",
    "choose_threshold",
    "CxrDetector",
    "bundle_detector",
    "find_embedding_layer",
    "EmbeddingTap",
    "EMBED_PREFIX",
]

#: every feature :func:`map_features` returns, in a fixed order
FEATURES: tuple[str, ...] = ("max_prob", "area", "mean_prob", "q99_prob", "bilateral")
#: features of the default detector (all of them; the CV driver reports each detector it fits)
DEFAULT_FEATURES: tuple[str, ...] = FEATURES
#: name prefix of the embedding features (principal components of the pooled encoder output)
EMBED_PREFIX = "emb_"
_EPS = 1e-4


def find_embedding_layer(net: torch.nn.Module, image_size: Sequence[int] = (64, 64)) -> str:
    """Name (for ``net.get_submodule``) of the bottleneck whose global average :class:`EmbeddingTap` keeps: among the
    modules whose output has the smallest spatial size in a forward pass of a zero image ``(1, C_in, *image_size)``,
    the last one with the most channels (so not a decoder's first 1x1 reduction).

    ``C_in`` is read from the first convolution weight. Works for any network whose modules are called in its
    forward (``InfectionUNet``: ``encoder_act``, the DenseNet encoder's output; MONAI ``UNet``: the bottom
    ``SkipConnection``).
    """
    weight = next(p for p in net.parameters() if p.ndim == len(image_size) + 2)
    seen: list[tuple[str, int, int]] = []
    hooks = []
    for name, mod in net.named_modules():
        if not name:
            continue

        def hook(_m, _i, out, name=name):
            out = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(out, torch.Tensor) and out.ndim == len(image_size) + 2:
                seen.append((name, int(np.prod(out.shape[2:])), int(out.shape[1])))

        hooks.append(mod.register_forward_hook(hook))
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, weight.shape[1], *image_size, dtype=weight.dtype, device=weight.device))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError("no module of the network returned a feature map")
    smallest = min(n for _, n, _ in seen)
    widest = max(c for _, n, c in seen if n == smallest)
    return [name for name, n, c in seen if n == smallest and c == widest][-1]


class EmbeddingTap:
    """Forward hook on ``net.get_submodule(layer)`` that keeps the global average of its output, ``(B, C)`` float32
    numpy in :attr:`value` (per thread: concurrent inferences in other threads do not overwrite it).

    Use as a context manager around a forward pass, or :meth:`attach` once to a network that inference runs (the
    bundle's evaluator, MONAI Label) and read :attr:`value` after each forward."""

    def __init__(self, net: torch.nn.Module, layer: str) -> None:
        self.module = net.get_submodule(layer) if layer else net
        self._local = threading.local()
        self._handle = None

    @property
    def value(self) -> np.ndarray | None:
        return getattr(self._local, "value", None)

    def clear(self) -> None:
        self._local.value = None

    def _hook(self, _module, _inputs, out) -> None:
        out = out[0] if isinstance(out, (tuple, list)) else out
        self._local.value = out.detach().float().mean(dim=tuple(range(2, out.ndim))).cpu().numpy()

    def attach(self) -> EmbeddingTap:
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> EmbeddingTap:
        self.clear()
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()


def map_features(
    prob: np.ndarray | torch.Tensor, lung: np.ndarray | torch.Tensor | None = None, threshold: float = 0.5
) -> dict[str, float]:
    """The detector's numbers of one probability map (see the module docstring), inside ``lung`` when given.

    An empty lung mask falls back to the whole image (a lung mask that found nothing must not hide the map).
    """
    p = _as_2d(prob).astype(np.float64)
    region = np.ones(p.shape, dtype=bool) if lung is None else _as_2d(lung) > 0.5
    if region.shape != p.shape:
        raise ValueError(f"lung mask {region.shape} and probability map {p.shape} differ in size")
    if not region.any():
        region = np.ones(p.shape, dtype=bool)
    inside = p[region]
    hot = (p >= threshold) & region
    cols = np.nonzero(region.any(axis=0))[0]
    mid = (cols[0] + cols[-1] + 1) / 2.0  # the region's own midline, not the image's
    x = np.arange(p.shape[1])[None, :]
    halves = [(region & (x < mid)), (region & (x >= mid))]
    side_area = [hot[h].sum() / max(h.sum(), 1) for h in halves]
    return {
        "max_prob": float(p.max()),
        "area": float(hot.sum() / region.sum()),
        "mean_prob": float(inside.mean()),
        "q99_prob": float(np.quantile(inside, 0.99)),
        "bilateral": float(min(side_area)),
    }


def _transform(name: str, values: np.ndarray) -> np.ndarray:
    """Feature value -> model input: logit of a probability, log of an area share (both monotone increasing); an
    embedding component as it is."""
    if name.startswith(EMBED_PREFIX):
        return np.asarray(values, dtype=np.float64)
    v = np.clip(np.asarray(values, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(v / (1.0 - v)) if name.endswith("_prob") else np.log(v)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))


def fit_logistic(X: np.ndarray, y: Sequence[int], l2: float = 1e-2, iters: int = 100) -> tuple[np.ndarray, float]:
    """Weights ``w`` and bias ``b`` of ``P(y=1 | x) = sigmoid(x @ w + b)`` by Newton/IRLS with an L2 penalty on ``w``.

    ``X`` is ``(N, F)`` (standardised features), ``y`` 0/1. The penalty keeps the fit finite when the classes
    separate; the bias is not penalised.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (N, F) with N = len(y), got {X.shape} for {len(y)} labels")
    if len(np.unique(y)) < 2:
        raise ValueError("fit_logistic needs both classes")
    A = np.concatenate([X, np.ones((len(X), 1))], axis=1)
    pen = np.full(A.shape[1], l2)
    pen[-1] = 0.0
    w = np.zeros(A.shape[1])
    for _ in range(iters):
        p = _sigmoid(A @ w)
        grad = A.T @ (p - y) + pen * w
        hess = (A * (p * (1 - p))[:, None]).T @ A + np.diag(pen) + 1e-9 * np.eye(A.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w[:-1], float(w[-1])


def choose_threshold(
    probs: Sequence[float], labels: Sequence[int], classes: Sequence[str] | None = None, min_specificity: float = 0.98
) -> float:
    """The lowest cut-off on ``probs`` at which the specificity of every negative class is ``>= min_specificity``.

    ``classes`` names the class of each item (e.g. ``non_covid`` / ``normal``; all negatives are one class when
    omitted); positives are ``labels == 1``. The cut-off lies midway between two neighbouring scores, so a rerun on
    the same predictions gives the same value. Pick it on training folds only.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    cls = np.asarray(
        ["negative" if c is None else str(c) for c in classes] if classes is not None else ["negative"] * len(p)
    )
    negatives = [p[(y == 0) & (cls == c)] for c in sorted(set(cls[y == 0]))]
    if not negatives:
        raise ValueError("choose_threshold needs negative examples")
    # per negative class: the smallest cut-off with at most floor((1 - s) n) scores at or above it
    cut = 0.0
    for neg in negatives:
        s = np.sort(neg)[::-1]
        allowed = int(np.floor((1.0 - min_specificity) * len(s) + 1e-9))
        if allowed >= len(s):
            continue
        top = s[allowed]  # the highest score that must fall below the cut-off
        above = p[p > top]
        nxt = above.min() if above.size else min(top + 1e-6, 1.0)
        cut = max(cut, float((top + nxt) / 2.0))
    return cut


@dataclass
class CxrDetector:
    """COVID-19 yes/no and a calibrated probability from an infection map (see the module docstring).

    ``rule="logistic"`` (default): ``covid_probability = sigmoid(sum_i w_i (t_i(f_i) - mean_i) / scale_i + bias)``,
    ``covid_detected = covid_probability >= threshold``. ``rule="paper"``: ``covid_probability`` = max p,
    ``covid_detected`` = max p ``>= threshold`` (0.5), no fitting. ``use_lung``: features inside a lung mask (the
    caller must then pass one) instead of the whole image.
    """

    rule: str = "logistic"
    features: tuple[str, ...] = DEFAULT_FEATURES
    weights: list[float] = field(default_factory=list)
    bias: float = 0.0
    mean: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    threshold: float = 0.5
    use_lung: bool = False
    map_threshold: float = 0.5
    embedding_layer: str = ""
    embedding_mean: list[float] = field(default_factory=list)
    embedding_components: list[list[float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in ("logistic", "paper"):
            raise ValueError(f"rule must be 'logistic' or 'paper', got {self.rule!r}")
        emb = {f"{EMBED_PREFIX}{i}" for i in range(len(self.embedding_components))}
        unknown = set(self.features) - set(FEATURES) - emb
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; choose from {FEATURES}")
        self.features = tuple(self.features)

    # ----------------------------------------------------------------------------------------------- fitting
    @classmethod
    def paper(cls, threshold: float = 0.5) -> CxrDetector:
        """The paper's rule: any pixel ``>= threshold``."""
        return cls(rule="paper", features=("max_prob",), threshold=threshold)

    @classmethod
    def fit(
        cls,
        rows: Sequence[Mapping[str, float]],
        labels: Sequence[int],
        classes: Sequence[str] | None = None,
        features: Sequence[str] = DEFAULT_FEATURES,
        min_specificity: float = 0.98,
        use_lung: bool = False,
        l2: float = 1e-2,
        embeddings: np.ndarray | None = None,
        n_components: int = 16,
        embedding_layer: str = "",
    ) -> CxrDetector:
        """Fit on feature rows (:func:`map_features` of out-of-fold maps) of training folds, threshold included.

        ``embeddings`` ``(N, C)``: the pooled encoder features of the same X-rays (:class:`EmbeddingTap` on
        ``embedding_layer``); their first ``n_components`` principal components (fitted here) join the features."""
        det = cls(rule="logistic", features=tuple(features), use_lung=use_lung)
        if embeddings is not None:
            E = np.asarray(embeddings, dtype=np.float64)
            if E.ndim != 2 or len(E) != len(rows):
                raise ValueError(f"embeddings must be (N, C) with N = {len(rows)} rows, got {E.shape}")
            if not embedding_layer:
                raise ValueError("name the embedding_layer the embeddings were pooled from")
            mean = E.mean(axis=0)
            k = int(min(n_components, E.shape[1], len(E) - 1))
            _, _, vt = np.linalg.svd(E - mean, full_matrices=False)
            det.embedding_layer = embedding_layer
            det.embedding_mean, det.embedding_components = mean.tolist(), vt[:k].tolist()
            det.features = tuple(features) + tuple(f"{EMBED_PREFIX}{i}" for i in range(k))
        design_rows = det._with_embedding(rows, embeddings)
        Z = det._design(design_rows, standardise=False)
        det.mean = Z.mean(axis=0).tolist()
        det.scale = np.where(Z.std(axis=0) > 1e-12, Z.std(axis=0), 1.0).tolist()
        w, b = fit_logistic(det._design(design_rows), labels, l2=l2)
        det.weights, det.bias = w.tolist(), b
        det.threshold = choose_threshold(det.probability(rows, embeddings), labels, classes, min_specificity)
        det.info = {"n": len(labels), "positives": int(np.sum(labels)), "min_specificity": min_specificity, "l2": l2}
        return det

    @property
    def needs_embedding(self) -> bool:
        """Whether :meth:`probability` / ``__call__`` need the pooled encoder features (``embedding_layer``)."""
        return bool(self.embedding_components)

    def _with_embedding(
        self, rows: Sequence[Mapping[str, float]], embeddings: np.ndarray | None
    ) -> Sequence[Mapping[str, float]]:
        """``rows`` with the embedding components ``emb_i`` added (unchanged when the detector reads none)."""
        if not self.needs_embedding:
            return rows
        if embeddings is None:
            raise ValueError(
                f"this detector reads the network's pooled '{self.embedding_layer}' features: pass the embedding "
                "(monai_covid.cxr_detector.EmbeddingTap)"
            )
        E = np.asarray(embeddings, dtype=np.float64).reshape(len(rows), -1)
        comps = np.asarray(self.embedding_components)
        if E.shape[1] != comps.shape[1]:
            raise ValueError(f"embedding has {E.shape[1]} features, the detector was fitted on {comps.shape[1]}")
        Z = (E - np.asarray(self.embedding_mean)) @ comps.T
        return [{**r, **{f"{EMBED_PREFIX}{i}": float(z) for i, z in enumerate(zi)}} for r, zi in zip(rows, Z)]

    # ----------------------------------------------------------------------------------------------- scoring
    def _design(self, rows: Sequence[Mapping[str, float]], standardise: bool = True) -> np.ndarray:
        Z = np.stack([_transform(f, np.array([r[f] for r in rows], dtype=np.float64)) for f in self.features], 1)
        return (Z - np.asarray(self.mean)) / np.asarray(self.scale) if standardise else Z

    def probability(self, rows: Sequence[Mapping[str, float]], embeddings: np.ndarray | None = None) -> np.ndarray:
        """``covid_probability`` of each feature row (calibrated for ``rule="logistic"``, max p for the paper);
        ``embeddings`` ``(N, C)`` when the detector reads the encoder (:attr:`needs_embedding`)."""
        if self.rule == "paper":
            return np.array([float(r["max_prob"]) for r in rows])
        if not self.weights:
            raise ValueError("this detector is not fitted (no weights); fit it or use CxrDetector.paper()")
        rows = self._with_embedding(rows, embeddings)
        return _sigmoid(self._design(rows) @ np.asarray(self.weights) + self.bias)

    def __call__(
        self,
        prob: np.ndarray | torch.Tensor,
        lung: np.ndarray | torch.Tensor | None = None,
        embedding: np.ndarray | torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """``covid_probability``, ``covid_detected`` (and the map features) of one probability map; ``embedding``
        ``(C,)``: the pooled encoder features of the same forward pass, when :attr:`needs_embedding`."""
        if self.use_lung and lung is None:
            raise ValueError("this detector was fitted on lung-restricted features: pass a lung mask")
        feats = map_features(prob, lung if self.use_lung else None, self.map_threshold)
        emb = None if embedding is None else np.asarray(torch.as_tensor(embedding).float().cpu()).reshape(1, -1)
        pr = float(self.probability([feats], emb)[0])
        return {"covid_probability": pr, "covid_detected": bool(pr >= self.threshold), **feats}

    # -------------------------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    def save(self, path: str | os.PathLike) -> Path:
        from monai_covid.io_utils import atomic_write_json

        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> CxrDetector:
        """A detector from its JSON file; ``None`` gives the paper's rule."""
        if path is None:
            return cls.paper()
        d = json.loads(Path(path).read_text())
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def bundle_detector(bundle: str | os.PathLike, config: Mapping[str, Any] | None = None) -> CxrDetector:
    """The detector a CXR bundle ships: ``detector`` of its ``configs/inference.json`` (a JSON path, usually
    ``"$@bundle_root + '/models/detector.json'"``) resolved against ``bundle``; ``null`` gives the paper's rule.

    ``config``: an already-read ``inference.json`` (e.g. MONAI Label's bundle config), else the file is read. The
    same detector therefore drives ``python -m monai.bundle run``, ``monai-covid infer --modality cxr`` and the MONAI
    Label CXR task."""
    from monai.bundle import ConfigParser

    root = Path(bundle)
    if config is None:
        parser = ConfigParser()
        parser.read_config(str(root / "configs" / "inference.json"))
    else:
        parser = ConfigParser(dict(config))
    value = parser.config.get("detector")
    if value is None:
        return CxrDetector.paper(float(parser.config.get("threshold", 0.5)))
    parser["bundle_root"] = str(root)
    path = Path(parser.get_parsed_content("detector", instantiate=False, eval_expr=True))
    if not path.is_absolute():
        path = root / path
    det = CxrDetector.load(path)
    if det.use_lung:
        raise ValueError(f"{path}: fitted on lung-restricted features, but the bundle predicts no lung mask")
    return det
