"""The tasks of ``rj run`` (one module each) and their registry.

``TASK_CLASSES`` maps the ``task.name`` of a configuration to its :class:`~.base.Task` class;
:func:`~rj_plugin.tasks.runner.run` drives one over the inputs.
"""

from __future__ import annotations

from rj_plugin.tasks.base import Task
from rj_plugin.tasks.global_lipschitz import GlobalLipschitzTask
from rj_plugin.tasks.jacobian import JacobianTask
from rj_plugin.tasks.lipschitz import LipschitzTask
from rj_plugin.tasks.monotonicity import MonotonicityTask
from rj_plugin.tasks.robustness import RobustnessTask
from rj_plugin.tasks.stationary import StationaryTask

TASK_CLASSES: dict[str, type[Task]] = {
    "jacobian": JacobianTask,
    "lipschitz": LipschitzTask,
    "global-lipschitz": GlobalLipschitzTask,
    "robustness": RobustnessTask,
    "stationary": StationaryTask,
    "monotonicity": MonotonicityTask,
}

__all__ = ["TASK_CLASSES", "Task"]
