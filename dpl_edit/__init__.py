"""dpl-edit: text-based editing of real images with Dynamic Prompt Learning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public API, imported on first use so that `import dpl_edit.errors` (or `dpl --help`) does not
# pay for importing torch and diffusers. The modules behind these names may move (they did, into
# engine/, dpl/, io/ and world/); the names stay, pinned by tests/test_public_api.py.
_EXPORTS = {
    "load_model": "dpl_edit.engine.model",
    "LoadedModel": "dpl_edit.engine.model",
    "invert": "dpl_edit.engine.inversion",
    "reconstruct": "dpl_edit.engine.inversion",
    "Inversion": "dpl_edit.engine.artifact",
    "edit": "dpl_edit.engine.edit",
    "EditResult": "dpl_edit.engine.edit",
    "InversionSettings": "dpl_edit.engine.settings",
    "NullTextSettings": "dpl_edit.engine.settings",
    "EditSettings": "dpl_edit.engine.settings",
    "DplLossConfig": "dpl_edit.dpl.losses",
    "BackgroundSettings": "dpl_edit.dpl.stage",
    "ORIGINAL_NULL_TEXT": "dpl_edit.dpl.stage",
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
    "InversionSettings",
    "NullTextSettings",
    "EditSettings",
    "DplLossConfig",
    "BackgroundSettings",
    "ORIGINAL_NULL_TEXT",
    "DplError",
]

if TYPE_CHECKING:
    from dpl_edit.dpl.losses import DplLossConfig
    from dpl_edit.dpl.stage import ORIGINAL_NULL_TEXT, BackgroundSettings
    from dpl_edit.engine.artifact import Inversion
    from dpl_edit.engine.edit import EditResult, edit
    from dpl_edit.engine.inversion import invert, reconstruct
    from dpl_edit.engine.model import LoadedModel, load_model
    from dpl_edit.engine.settings import EditSettings, InversionSettings, NullTextSettings
    from dpl_edit.errors import DplError


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dpl_edit' has no attribute '{name}'")
