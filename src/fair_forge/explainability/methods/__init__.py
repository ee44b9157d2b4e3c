"""Attribution methods: the registry (``registry``), the one plan driver (``drive``) and the estimators.

The names users reach for are re-exported here; the built-in methods register on first use of the registry.
"""

from .registry import (MethodContext, MethodParams, MethodSpec, RawAttribution, SampledParams, available_methods,
                       get_method, methods_reference, register_method)

__all__ = ["MethodContext", "MethodParams", "MethodSpec", "RawAttribution", "SampledParams", "available_methods",
           "get_method", "methods_reference", "register_method"]
