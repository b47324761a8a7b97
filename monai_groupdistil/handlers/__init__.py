"""Ignite/MONAI handlers for group-robust distillation (need pytorch-ignite)."""

from monai_groupdistil.handlers.group_accuracy_handler import GroupAccuracyHandler
from monai_groupdistil.handlers.group_dro_handler import GroupDROHandler, iteration_scalars
from monai_groupdistil.handlers.group_metric_handler import GroupMetricHandler, batch_spacing, extract_groups
from monai_groupdistil.handlers.group_report_handler import (
    GroupMetricReportHandler,
    GroupReportHandler,
    per_sample_cross_entropy,
)
from monai_groupdistil.handlers.held_out_dro_handler import HeldOutGroupDROHandler
from monai_groupdistil.handlers.prediction_writer import (
    AtomicNibabelWriter,
    ClassProbabilitySaver,
    InferenceFailedError,
    InferenceFailureHandler,
    write_csv_atomically,
)

__all__ = [
    "AtomicNibabelWriter",
    "ClassProbabilitySaver",
    "GroupAccuracyHandler",
    "GroupDROHandler",
    "GroupMetricHandler",
    "GroupMetricReportHandler",
    "GroupReportHandler",
    "HeldOutGroupDROHandler",
    "InferenceFailedError",
    "InferenceFailureHandler",
    "batch_spacing",
    "extract_groups",
    "iteration_scalars",
    "per_sample_cross_entropy",
    "write_csv_atomically",
]
