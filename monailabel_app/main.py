"""MONAI Label app serving the monai-covid bundles to 3D Slicer, OHIF or any MONAI Label client.

Start it with ``make label`` (see ``docs/monailabel.md``), or by hand::

    .venv-label/bin/monailabel start_server --app monailabel_app --studies out/label_studies \\
        --host 127.0.0.1 --port 8000 --conf skip_trainers true

Infer tasks (``/info`` lists those whose bundle weights are present):

- ``lesion_asegnet`` (and ``lesion_cosup`` when that bundle is installed): CT lesion mask, label ``lesion`` = 1;
- ``lung``: lung mask by threshold and morphology, label ``lung`` = 1;
- ``covid_resnextplus``: CT volume COVID-19 probability and slice scores (JSON);
- ``cxr_infection``: chest X-ray infection mask, label ``infection`` = 1, with the COVID-19 call (JSON), for PNG/JPEG.

Inference only: the app has no trainers, no active-learning strategy beyond MONAI Label's random one, and downloads
nothing. Weights are read from ``bundles/`` of this repository (the environment variable ``MONAI_COVID_BUNDLES``
points elsewhere).

Conf keys (``--conf KEY VALUE``): ``models`` (comma-separated task names to serve; default all present),
``skip_trainers`` (accepted for compatibility with MONAI Label's sample apps; there are no trainers here anyway).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random

from lib.infers.classifier import CovidClassification
from lib.infers.cxr import CXRInfection
from lib.infers.lesion import LesionSegmentation
from lib.infers.lung import LungMask

logger = logging.getLogger(__name__)

#: task name -> (name in ``monai_covid.batch.BUNDLES``, paper)
LESION_TASKS = {
    "lesion_asegnet": ("asegnet", "A-SegNet, paper 000"),
    "lesion_cosup": ("cosup", "Co-supervision ResUnet, paper 001"),
}


class MonaiCovidApp(MONAILabelApp):
    """Inference-only MONAI Label app over the repo's bundles."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        from monai_covid import __version__
        from monai_covid.batch import bundles_dir

        conf = conf or {}
        # the same folder monai_covid.batch.ModelSet loads from (MONAI_COVID_BUNDLES overrides the repo's bundles/)
        self.bundles = bundles_dir()
        wanted = conf.get("models", "").strip()
        self.wanted = {m.strip() for m in wanted.split(",") if m.strip()} or None
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monai-covid",
            description="COVID-19 CT lesion and lung segmentation, CT volume COVID-19 classification, CXR infection "
            "maps (research models, not for diagnosis)",
            version=__version__,
        )

    def _bundle(self, name: str) -> Path:
        from monai_covid.batch import BUNDLES

        return self.bundles / BUNDLES[name][0]

    def init_infers(self) -> dict[str, InferTask]:
        makers: dict[str, Any] = {
            task: (lambda name=name, paper=paper: LesionSegmentation(name, self._bundle(name), paper))
            for task, (name, paper) in LESION_TASKS.items()
        }
        makers["lung"] = LungMask
        makers["covid_resnextplus"] = lambda: CovidClassification("resnextplus", self._bundle("resnextplus"))
        makers["cxr_infection"] = lambda: CXRInfection("cxr", self._bundle("cxr"))
        served: dict[str, InferTask] = {}
        for name, make in makers.items():
            if self.wanted is not None and name not in self.wanted:
                continue
            try:
                task = make()
            except Exception as e:  # a broken bundle must not take the other models down with it
                logger.error(f"+++ not serving {name}: {type(e).__name__}: {e}")
                continue
            if not task.is_valid():
                logger.info(f"+++ not serving {name}: no weights under {self.bundles}")
                continue
            logger.info(f"+++ Adding Inferer:: {name} => {task}")
            served[name] = task
        if self.wanted is not None and self.wanted - set(served):
            logger.warning(f"+++ requested but not available: {sorted(self.wanted - set(served))}")
        # the segment names a viewer offers: those of the segmentation tasks, not the classifier's class names
        self.labels = self._segment_labels(served)
        return served

    @staticmethod
    def _segment_labels(tasks: dict[str, InferTask]) -> list[str]:
        labels: list[str] = []
        for task in tasks.values():
            if task.type == "segmentation":
                for label in task.labels:
                    if label not in labels:
                        labels.append(label)
        return labels

    def init_trainers(self) -> dict[str, TrainTask]:
        return {}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random()}

    def init_scoring_methods(self) -> dict[str, Any]:
        return {}
