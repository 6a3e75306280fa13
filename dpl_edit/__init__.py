"""dpl-edit: text-based editing of real images with Dynamic Prompt Learning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public API, imported on first use so that `import dpl_edit.errors` (or `dpl --help`) does not
# pay for importing torch and diffusers.
_EXPORTS = {
    "load_model": "dpl_edit.model",
    "LoadedModel": "dpl_edit.model",
    "invert": "dpl_edit.inversion",
    "reconstruct": "dpl_edit.inversion",
    "Inversion": "dpl_edit.inversion",
    "edit": "dpl_edit.edit",
    "EditResult": "dpl_edit.edit",
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
    from dpl_edit.edit import EditResult, edit
    from dpl_edit.errors import DplError
    from dpl_edit.inversion import Inversion, invert, reconstruct
    from dpl_edit.model import LoadedModel, load_model


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dpl_edit' has no attribute '{name}'")
