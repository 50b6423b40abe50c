"""rj_plugin: certified bounds on a network's Jacobian (RecurJac) for the auto_LiRPA ecosystem.

Public names: :func:`load_model`, :func:`bound_jacobian`, :class:`JacobianBounds`,
:class:`JacobianBounder`.
"""

from rj_plugin.api import JacobianBounder, JacobianBounds, bound_jacobian
from rj_plugin.models import load_model

__all__ = ["JacobianBounder", "JacobianBounds", "bound_jacobian", "load_model"]
__version__ = "0.1.0"
