"""Experiment tracking of the bundles' runs (``python -m monai.bundle run ... --tracking mlflow``).

MONAI's ``--tracking mlflow`` appends an ``MLFlowHandler`` to the trainer's and the evaluators' handler lists. The
bundles' ``run`` lists call :py:func:`track_run` before running, which gives those handlers the run's parameters
(:py:func:`run_parameters`), the files to record as artifacts and, for the trainer's handler, the ``output_transform``
that logs the loss and the DRO values of every iteration (``monai_groupdistil.handlers.iteration_scalars``);
:py:class:`WorstGroupHandler` puts the index of the worst group into the validation metrics, so it is tracked (and
printed, and written to TensorBoard) with the per-group metrics. Nothing here imports ``mlflow``: without
``--tracking`` these are no-ops.

MLflow waits 120 s for each request and retries it 7 times by default, so a tracking server that accepts connections
but never answers would hold a run for about 16 minutes. :py:func:`track_run` bounds the waiting: it sets MLflow's
request timeout and retries (``MLFLOW_HTTP_REQUEST_TIMEOUT``, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``) from the bundle
ids ``mlflow_request_timeout`` and ``mlflow_max_retries`` unless they are exported in the environment, and logs
the values in effect with the ids that change them; MLflow's own error then names the URI it could not reach.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["WorstGroupHandler", "loss_parameters", "mlflow_request_settings", "run_parameters", "track_run"]

logger = logging.getLogger("monai_groupdistil.bundle")  # the bundles' logger

# bundle id -> MLflow's environment variable (read by MLflow at every request)
MLFLOW_REQUEST_IDS = {
    "mlflow_request_timeout": "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "mlflow_max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
}
# what this process set itself, so that a later run in the same process (train, then evaluate) may change it
_SET_HERE: dict[str, str] = {}


def _param_value(value: Any) -> Any:
    """A value MLflow can record as a parameter (str() of it), or None to leave it out."""
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else None
    if isinstance(value, (str, bool, numbers.Number)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [v if isinstance(v, (str, bool, numbers.Number)) or v is None else _text(v) for v in value]
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    return _text(value)


def _text(value: Any) -> str:
    """``value`` as text that is the same in every process: a function by its qualified name, a ``partial`` by its
    function and arguments, another object by its type when its text holds a memory address."""
    if isinstance(value, functools.partial):
        args = [_text(a) if callable(a) else repr(a) for a in value.args]
        args += [f"{k}={_text(v) if callable(v) else repr(v)}" for k, v in value.keywords.items()]
        return f"partial({_text(value.func)}{''.join(', ' + a for a in args)})"
    if inspect.isfunction(value) or inspect.isbuiltin(value):
        return f"{getattr(value, '__module__', None) or ''}.{value.__qualname__}".lstrip(".")
    text = str(value)
    return type(value).__qualname__ if " at 0x" in text else text


def run_parameters(loss: Any, settings: Mapping[str, Any], splits: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The parameters of a bundle run: ``settings`` (bundle ids), the data and the loss's class and hyper-parameters.

    The loss's hyper-parameters are the arguments of its constructor that it keeps as attributes of the same name
    (``temperature``, ``alpha``, ``step_size``, ``absent_groups``... for the GroupDistil loss; ``label_smoothing``
    for cross entropy), recorded as ``loss.<name>``; the loss's class is ``loss``. So each method's run records
    the hyper-parameters its loss actually uses. What a run's numbers also depend on is added:
    ``torch_num_threads`` (intra-op threads: results differ between thread counts, see ``docs/operations.md``),
    ``torch_version``, ``monai_version``; with ``splits`` (the bundles' ``splits`` id) also ``train_samples``,
    ``val_samples``, ``test_samples``, ``group_names`` and ``group_counts``.

    Args:
        loss: the run's loss module.
        settings: bundle id -> value.
        splits: ``{"train": [...], "val": [...], "test": [...], "group_names": [...], "group_counts": [...]}``.

    Returns:
        name -> value, values as numbers, strings, booleans or lists of them.

    Example::

        >>> import torch
        >>> run_parameters(torch.nn.CrossEntropyLoss(label_smoothing=0.1), {"seed": 0})["loss.label_smoothing"]
        0.1
    """
    params = {str(k): _param_value(v) for k, v in settings.items()}
    if splits is not None:
        params.update({f"{part}_samples": len(splits[part]) for part in ("train", "val", "test") if part in splits})
        params.update({k: _param_value(splits[k]) for k in ("group_names", "group_counts") if k in splits})
    import monai

    params.update(torch_num_threads=torch.get_num_threads(), torch_version=torch.__version__)
    params["monai_version"] = monai.__version__
    params.update(loss_parameters(loss))
    return params


def loss_parameters(loss: Any) -> dict[str, Any]:
    """The loss's class, as ``loss``, and its hyper-parameters, as ``loss.<name>``: the arguments of its constructor
    that it keeps as attributes of the same name (a loss module among them, such as ``GroupDROLoss``'s ``loss_fn``,
    as ``loss.loss_fn`` with its own, ``loss.loss_fn.<name>``). Recorded by :py:func:`run_parameters`, and compared
    by the bundles' resume check (a run resumed with another ``alpha`` would not be the interrupted run). Values are
    the same in every process: a function is given by its qualified name, never with a memory address.

    Args:
        loss: a loss module.

    Returns:
        name -> value, values as numbers, strings, booleans or lists of them (a tensor of more than 16 values is
        left out).

    Example::

        >>> import torch
        >>> loss_parameters(torch.nn.CrossEntropyLoss(label_smoothing=0.1))["loss.label_smoothing"]
        0.1
    """
    return _module_parameters(loss, "loss")


def _module_parameters(module: Any, prefix: str) -> dict[str, Any]:
    params: dict[str, Any] = {prefix: type(module).__name__}
    try:
        names = list(inspect.signature(type(module)).parameters)
    except (TypeError, ValueError):
        names = []
    for name in names:
        if name in ("self", "args", "kwargs") or not hasattr(module, name):
            continue
        attribute = getattr(module, name)
        if isinstance(attribute, torch.nn.Module):  # e.g. GroupDROLoss's loss_fn: its own hyper-parameters too
            params.update(_module_parameters(attribute, f"{prefix}.{name}"))
            continue
        value = _param_value(attribute)
        if value is not None:
            params[f"{prefix}.{name}"] = value
    return params


def _check_request_setting(name: str, value: Any, lowest: int, highest: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lowest:
        raise ValueError(f"{name} must be a whole number >= {lowest}, got {value!r}.")
    if highest is not None and value > highest:
        raise ValueError(f"{name} must be at most {highest} (MLflow refuses more retries), got {value!r}.")
    return int(value)


def mlflow_request_settings(request_timeout: int | None = None, max_retries: int | None = None) -> dict[str, str]:
    """Set MLflow's request timeout and retries in ``os.environ``, unless the user exported them there.

    MLflow reads ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (seconds each request may wait for the server, default 120) and
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (default 7, with exponential backoff) at every request. A value exported in
    the environment wins over the argument (the bundle id), and is logged; a value this function set earlier in the
    same process is replaced. None leaves a variable as it is.

    Args:
        request_timeout: seconds per request (the bundle id ``mlflow_request_timeout``), a whole number >= 1.
        max_retries: retries of a failed request (the bundle id ``mlflow_max_retries``), a whole number from 0 to
            MLflow's limit (10).

    Returns:
        environment variable -> the value in effect, for the variables given.

    Raises:
        ValueError: when a value is not a whole number in range.
    """
    wanted = {}
    if request_timeout is not None:
        wanted["mlflow_request_timeout"] = _check_request_setting("mlflow_request_timeout", request_timeout, 1)
    if max_retries is not None:
        limit = int(os.environ.get("_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT", "10"))
        wanted["mlflow_max_retries"] = _check_request_setting("mlflow_max_retries", max_retries, 0, limit)
    in_effect = {}
    for bundle_id, value in wanted.items():
        variable = MLFLOW_REQUEST_IDS[bundle_id]
        current = os.environ.get(variable)
        if current is not None and current != _SET_HERE.get(variable):
            if current != str(value):
                logger.info("%s=%s from the environment is used, not %s=%s", variable, current, bundle_id, value)
            in_effect[variable] = current
            continue
        os.environ[variable] = _SET_HERE[variable] = str(value)
        in_effect[variable] = str(value)
    return in_effect


def _is_mlflow_handler(handler: Any) -> bool:
    return any(cls.__name__ == "MLFlowHandler" and cls.__module__.startswith("monai.") for cls in type(handler).__mro__)


# MONAI's tracking patch joins a literal output_dir and the executed config's name as "<dir> + '/config_<time>.json'"
_BROKEN_JOIN = re.compile(r"^(.*) \+ '/(config_\d{8}_\d{6}\.json)'$")


def track_run(
    handlers: Sequence[Any],
    params: Mapping[str, Any] | None = None,
    artifacts: Sequence[str] = (),
    output_transform: Callable[[Any], Any] | None = None,
    request_timeout: int | None = None,
    max_retries: int | None = None,
) -> int:
    """Give the ``MLFlowHandler``\\ s among ``handlers`` the run's parameters and the artifacts to record.

    ``--tracking mlflow`` builds the handlers with MONAI's default arguments; this adds ``params`` to their
    ``experiment_param`` (recorded when the run starts) and ``artifacts`` (files or folders, recorded when the
    engine completes, after the bundle's own handlers, e.g. the group report, have written them) to their
    ``artifacts``. Without tracking there is no such handler and nothing happens.

    MONAI (1.6) records the executed config as an artifact, but when ``output_dir`` is given as a plain path (on
    the command line) it builds the artifact's path as the text ``"<output_dir> + '/config_<time>.json'"``, which
    names no file; such a path is corrected here.

    When there is an MLflow handler, MLflow's request timeout and retries are set from ``request_timeout`` and
    ``max_retries`` (:py:func:`mlflow_request_settings`; values exported in the environment win), so that a
    tracking server that does not answer fails the run within about a minute with the bundles' defaults (15 s,
    2 retries: 3 x 15 s plus about 5 s of backoff) instead of about 16 minutes, with MLflow's error naming the URI;
    the values in effect are logged (INFO) with the ids that change them.

    Args:
        handlers: an engine's handler list (``@train#handlers``, ``@handlers``...).
        params: name -> value.
        artifacts: paths.
        output_transform: replaces the handlers' ``output_transform`` (what they log every iteration); the
            training runs pass :py:func:`monai_groupdistil.handlers.iteration_scalars` (the loss and the DRO
            weights, group losses and counts of the iteration).
        request_timeout: seconds MLflow waits for each request (the bundle id ``mlflow_request_timeout``); None
            leaves MLflow's setting.
        max_retries: retries of a request that fails (the bundle id ``mlflow_max_retries``); None leaves MLflow's
            setting.

    Returns:
        the number of MLflow handlers updated.

    Raises:
        ValueError: when ``request_timeout`` or ``max_retries`` is not a whole number in range.
    """
    mlflow_handlers = [handler for handler in handlers or () if _is_mlflow_handler(handler)]
    if mlflow_handlers:
        in_effect = mlflow_request_settings(request_timeout, max_retries)
        logger.info(
            "MLflow requests wait at most %s s and are retried %s times (bundle ids mlflow_request_timeout, "
            "mlflow_max_retries; exported variables win)",
            in_effect.get("MLFLOW_HTTP_REQUEST_TIMEOUT", os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")),
            in_effect.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")),
        )
    count = 0
    for handler in mlflow_handlers:
        if params:
            handler.experiment_param = {**(handler.experiment_param or {}), **params}
        fixed = []
        for path in handler.artifacts:
            match = _BROKEN_JOIN.match(str(path)) if path else None
            fixed += [os.path.join(match.group(1), match.group(2))] if match else [path] if path else []
        handler.artifacts = tuple(fixed) + tuple(str(a) for a in artifacts)
        if output_transform is not None:
            handler.output_transform = output_transform
        count += 1
    return count


class WorstGroupHandler:
    """Writes the index of the worst group (``<output_key>``, a float for the loggers) into the evaluator's metrics.

    Reads ``<metric_prefix><name>`` for every group name from ``engine.state.metrics`` at ``EPOCH_COMPLETED``
    (after the metrics are computed; put it first in the evaluator's handlers, so that ``StatsHandler``,
    ``TensorBoardStatsHandler`` and ``MLFlowHandler`` log it in the same round) and stores the index (in
    ``group_names``) of the smallest value, NaN (a group without samples) skipped, the first one on a tie.

    Args:
        group_names: the group names, in group-id order.
        metric_prefix: prefix of the per-group metric keys (``GroupAccuracyHandler`` writes ``group_accuracy/<name>``).
        output_key: the metric key written.
        higher_is_better: False for metrics where the largest value is the worst (a loss).

    Example::

        SupervisedEvaluator(..., key_val_metric={"val_worst_group_accuracy": GroupAccuracyHandler(4, names)},
                            val_handlers=[WorstGroupHandler(names), StatsHandler(iteration_log=False)])
    """

    def __init__(
        self,
        group_names: Sequence[str],
        metric_prefix: str = "group_accuracy/",
        output_key: str = "worst_group_index",
        higher_is_better: bool = True,
    ) -> None:
        self.group_names = [str(n) for n in group_names]
        self.metric_prefix = metric_prefix
        self.output_key = output_key
        self.higher_is_better = higher_is_better

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = engine.state.metrics
        worst, worst_value = None, None
        for index, name in enumerate(self.group_names):
            value = metrics.get(f"{self.metric_prefix}{name}")
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            value = float(value) if self.higher_is_better else -float(value)
            if worst_value is None or value < worst_value:
                worst, worst_value = index, value
        if worst is None:
            metrics.pop(self.output_key, None)
        else:
            metrics[self.output_key] = float(worst)
