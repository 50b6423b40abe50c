"""rj_plugin: certified bounds on a network's Jacobian (RecurJac) for the auto_LiRPA ecosystem.

Public names: :func:`load_model`, :func:`bound_jacobian`, :class:`JacobianBounds`,
:class:`JacobianBounder`, :func:`exact_lipschitz`, :func:`local_lipschitz`, :class:`JacobianOf`
(importing the package registers the ``rj_plugin::Jacobian`` bound operator in auto_LiRPA).
"""

from rj_plugin.api import JacobianBounder, JacobianBounds, bound_jacobian
from rj_plugin.exact import ExactLipschitz, exact_lipschitz
from rj_plugin.models import load_model
from rj_plugin.operator import JacobianOf
from rj_plugin.refine import LocalLipschitz, local_lipschitz

__all__ = ["ExactLipschitz", "JacobianBounder", "JacobianBounds", "JacobianOf", "LocalLipschitz",
           "bound_jacobian", "exact_lipschitz", "load_model", "local_lipschitz"]
__version__ = "0.1.0"
