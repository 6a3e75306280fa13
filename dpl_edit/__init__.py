"""dpl-edit: text-based editing of real images with Dynamic Prompt Learning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public API, imported on first use so that `import dpl_edit.errors` (or `dpl --help`) does not
# pay for importing torch and diffusers.
_EXPORTS = {
    "load_model": "dpl_edit.engine.model",
    "LoadedModel": "dpl_edit.engine.model",
    "invert": "dpl_edit.engine.inversion",
    "reconstruct": "dpl_edit.engine.inversion",
    "Inversion": "dpl_edit.engine.inversion",
    "edit": "dpl_edit.engine.edit",
    "EditResult": "dpl_edit.engine.edit",
    "DplError": "dpl_edit.errors",
}
__all__ = [
    "__version__",
    "load_model",
    "LoadedModel",
    "invert",
    "reconstruct",
    "Inversion",
    "edit",
    "EditResult",
    "DplError",
]

if TYPE_CHECKING:
    from dpl_edit.engine.edit import EditResult, edit
    from dpl_edit.engine.inversion import Inversion, invert, reconstruct
    from dpl_edit.engine.model import LoadedModel, load_model
    from dpl_edit.errors import DplError


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dpl_edit' has no attribute '{name}'")
