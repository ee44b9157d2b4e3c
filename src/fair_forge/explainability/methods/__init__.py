"""Attribution methods: the registry (``registry``), parameter models, and the built-in estimators.

Importing this package registers the built-in methods: the registry cannot be reached without it (Python imports a
package before its modules), so ``get_method`` always sees them, and the registry never imports its methods (they
import it). The names users reach for are re-exported here.
"""

from . import attention, gradient, perturbation  # noqa: F401  (their @register_method decorators run)
from .registry import (MethodContext, MethodParams, MethodSpec, RawAttribution, SampledParams, available_methods,
                       get_method, methods_reference, register_method)

__all__ = ["MethodContext", "MethodParams", "MethodSpec", "RawAttribution", "SampledParams", "available_methods",
           "get_method", "methods_reference", "register_method"]
