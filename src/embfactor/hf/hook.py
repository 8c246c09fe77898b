"""Register embfactor's quantization method with transformers when transformers' quantizer registry is imported.

Importing transformers' quantizer registry costs about a second (it imports torch and every quantizer); embfactor's
import must stay cheap, so ``import embfactor`` only installs a finder on ``sys.meta_path`` that runs
:func:`register` right after ``transformers.quantizers.auto`` is executed (the same idea as wrapt's post-import
hooks). If that module is already imported, registration happens at once.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

# The quant_method of embfactor.surgery.qconfig.EmbfactorConfig (tests/test_imports.py checks they agree): a literal
# here, since importing the record would import torch and transformers on `import embfactor`.
QUANT_METHOD = "embfactor"
_TARGET = "transformers.quantizers.auto"
_registered = False


def register() -> bool:
    """Register embfactor's quantization config and quantizer with transformers (idempotent).

    Returns:
        True once registered; False when the installed transformers has no registration API (then compressed
        folders load with ``embfactor.load`` only).

    Example:
        >>> from embfactor.hf import register
        >>> register()                  # doctest: +SKIP
        True
    """
    global _registered
    if _registered:
        return True
    try:
        from transformers.quantizers import auto
    except ImportError:
        return False
    if not hasattr(auto, "register_quantizer") or not hasattr(auto, "register_quantization_config"):
        return False
    from embfactor.hf.quantizer import EmbfactorHfQuantizer
    from embfactor.surgery.qconfig import EmbfactorConfig

    # setdefault, not the decorators: they refuse a second registration, and a re-imported embfactor (tests,
    # importlib.reload) must keep working. Registering twice from two threads puts the same classes in: harmless.
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, EmbfactorConfig)
    auto.AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, EmbfactorHfQuantizer)
    _registered = True
    return True


# Plain classes, not importlib.abc subclasses: importing importlib.abc costs ~30 ms (it imports importlib.resources),
# more than the rest of `import embfactor`; the import system only needs the methods.
class _Loader:
    """Runs the real loader, then registers embfactor in the freshly executed module's registry."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        try:
            register()
        except Exception:  # noqa: BLE001 - a failed registration must never break importing transformers
            import logging

            logging.getLogger("embfactor").debug("embfactor: registration with transformers failed", exc_info=True)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package ... of the real loader
        return getattr(self._loader, name)


class _Finder:
    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install_registration_hook() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it gets imported (idempotent)."""
    if _TARGET in sys.modules:
        try:
            register()
        except Exception:  # noqa: BLE001 - never break `import embfactor`
            pass
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
