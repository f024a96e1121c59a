"""Ablation studies of the paper (Sec. 3.2, 3.3 and 5) at a scale that runs on a CPU or GPUs.

Example::

    from polynet.ablation import StudyOptions, run_study

    run = run_study("stages", "runs/ablation/stages", StudyOptions(seeds=3))
    print((run.out / "report.md").read_text())

:mod:`~polynet.ablation.studies` defines the studies, :mod:`~polynet.ablation.runner` trains
and caches their (config, seed) pairs (:mod:`~polynet.ablation.results` is the folder of
result files, :mod:`~polynet.ablation.shards` splits the pairs over jobs,
:mod:`~polynet.ablation.timing` times one iteration of each config),
:mod:`~polynet.ablation.report` writes tables and the report from
:mod:`~polynet.ablation.aggregate` (per-config means and intervals),
:mod:`~polynet.ablation.findings` (the paper's claims, by the paired-by-seed rule of
:mod:`~polynet.ablation.stats`) and :mod:`~polynet.ablation.plots`. ``polynet ablate`` is the
command line.
"""

from polynet.ablation.aggregate import Point, aggregate
from polynet.ablation.findings import Finding
from polynet.ablation.report import write_outputs
from polynet.ablation.results import ResultStore
from polynet.ablation.runner import (
    FULL_RECIPE,
    SMALL_RECIPE,
    StudyOptions,
    StudyRun,
    model_costs,
    recipe_for,
    report_study,
    run_study,
)
from polynet.ablation.shards import Shard
from polynet.ablation.stats import Interval, interval, t_quantile
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
from polynet.ablation.timing import measure_iteration_times

__all__ = [
    "FULL_RECIPE",
    "RESNET_LAYERS",
    "RESNET_MODEL",
    "SCALES",
    "SMALL_RECIPE",
    "SMALL_WIDTH",
    "STUDIES",
    "Finding",
    "Interval",
    "Point",
    "PreActResNet",
    "ResultStore",
    "Shard",
    "Study",
    "StudyConfig",
    "StudyOptions",
    "StudyRun",
    "aggregate",
    "build_study",
    "create_study_model",
    "interval",
    "measure_iteration_times",
    "model_costs",
    "recipe_for",
    "report_study",
    "run_study",
    "t_quantile",
    "write_outputs",
]
