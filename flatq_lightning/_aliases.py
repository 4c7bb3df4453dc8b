"""Import aliases for the modules that moved when the package was split into its four parts.

``flatq_lightning.train`` became ``flatq_lightning.app.train``, ``flatq_lightning.ptq_runner`` became
``flatq_lightning.ptq.runner`` and so on (:data:`MOVED`). Code written against the old names keeps working: an
old name imports the new module itself (the same object, so ``monkeypatch`` and ``isinstance`` agree), lazily,
and ``python -m`` on an old name runs the new module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import CodeType, ModuleType

#: old module name -> new module name (submodules follow their package)
MOVED: dict[str, str] = {
    "flatq_lightning.train": "flatq_lightning.app.train",
    "flatq_lightning.module": "flatq_lightning.app.module",
    "flatq_lightning.data": "flatq_lightning.app.data",
    "flatq_lightning.models": "flatq_lightning.app.models",
    "flatq_lightning.ptq_runner": "flatq_lightning.ptq.runner",
    "flatq_lightning.ptq_cli": "flatq_lightning.app.ptq_cli",
    "flatq_lightning.ptq.cli": "flatq_lightning.app.ptq_cli",
    "flatq_lightning.report": "flatq_lightning.ptq.report",
    "flatq_lightning.export": "flatq_lightning.ptq.export",
    "flatq_lightning.callbacks.ptq": "flatq_lightning.ptq.callback",
    "flatq_lightning.quant.ptq": "flatq_lightning.quant.quantize",
    "flatq_lightning.mse": "flatq_lightning.callbacks.mse",
    "flatq_lightning.sam": "flatq_lightning.callbacks.sam",
    "flatq_lightning.schedules": "flatq_lightning.callbacks.schedules",
    "flatq_lightning.flatness": "flatq_lightning.callbacks.flatness.measures",
}


def new_name(name: str) -> str | None:
    """The current name of module ``name`` if it moved, else ``None``."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class _AliasImporter(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        target_name = new_name(fullname)
        if target_name is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=target_name)

    def create_module(self, spec) -> ModuleType:  # type: ignore[no-untyped-def]
        return importlib.import_module(str(spec.origin))

    def exec_module(self, module: ModuleType) -> None:
        pass  # the new module is already executed

    def get_code(self, fullname: str) -> CodeType | None:  # ``python -m <old name>``
        spec = importlib.util.find_spec(str(new_name(fullname)))
        loader = getattr(spec, "loader", None)
        return loader.get_code(spec.name) if isinstance(loader, importlib.abc.InspectLoader) else None

    def get_source(self, fullname: str) -> str | None:
        return None

    def is_package(self, fullname: str) -> bool:
        spec = importlib.util.find_spec(str(new_name(fullname)))
        return spec is not None and spec.submodule_search_locations is not None


def install() -> None:
    if not any(isinstance(f, _AliasImporter) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasImporter())
