"""Verb modules (`python -m fastserve.<verb>`) that stay callable as the API function of the same name.

`import fastserve.export` binds the attribute `fastserve.export` to the module, hiding the API function
`fastserve.export()`; giving the module a `__call__` that forwards to `fastserve.api.export` keeps both meanings.
"""
from __future__ import annotations

import sys
import types
from typing import Any


class _VerbModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from fastserve import api
        return getattr(api, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def callable_verb(module_name: str) -> None:
    """Makes the module `module_name` (a verb of fastserve.api) callable as that verb."""
    sys.modules[module_name].__class__ = _VerbModule
