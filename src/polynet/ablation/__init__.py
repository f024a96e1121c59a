"""Ablation studies of the paper (Sec. 3.2, 3.3 and 5) at a scale that runs on a CPU or GPUs.

Example::

    from polynet.ablation import StudyOptions, run_study

    run = run_study("stages", "runs/ablation/stages", StudyOptions(seeds=1))
    print((run.out / "report.md").read_text())

:mod:`~polynet.ablation.studies` defines the studies, :mod:`~polynet.ablation.runner` trains,
times and caches their configs, :mod:`~polynet.ablation.report` writes tables, plots and the
report. ``polynet ablate`` is the command line.
"""

from polynet.ablation.report import Finding, Point, aggregate, write_outputs
from polynet.ablation.runner import (
    FULL_RECIPE,
    SMALL_RECIPE,
    StudyOptions,
    StudyRun,
    measure_iteration_times,
    model_costs,
    recipe_for,
    run_study,
)
from polynet.ablation.studies import (
    RESNET_LAYERS,
    RESNET_MODEL,
    SCALES,
    SMALL_WIDTH,
    STUDIES,
    PreActResNet,
    Study,
    StudyConfig,
    build_study,
    create_study_model,
)

__all__ = [
    "FULL_RECIPE",
    "RESNET_LAYERS",
    "RESNET_MODEL",
    "SCALES",
    "SMALL_RECIPE",
    "SMALL_WIDTH",
    "STUDIES",
    "Finding",
    "Point",
    "PreActResNet",
    "Study",
    "StudyConfig",
    "StudyOptions",
    "StudyRun",
    "aggregate",
    "build_study",
    "create_study_model",
    "measure_iteration_times",
    "model_costs",
    "recipe_for",
    "run_study",
    "write_outputs",
]
