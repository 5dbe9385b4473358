"""Test tooling only: lets vLLM's CPU build import transformers' image processors without torchvision.

transformers 5.x keeps two twins per image processor: ``image_processing_<m>`` (torchvision backend,
imports torchvision at module level) and ``image_processing_pil_<m>`` (PIL backend). vLLM imports
the first (e.g. ``models/pixtral.py`` while inspecting LLaVA). PyPI's torchvision does not import
beside the CPU torch these machines use, so where torchvision is absent this finder answers an
import of the first with the second, its ``XxxPil`` classes also named ``Xxx``. Installed by a
``.pth`` file (``tests/vllm_env/install.py``) so that the engine processes vLLM spawns get it too.
Where torchvision imports, it does nothing. It is never part of the product.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys

_TWIN = re.compile(r"^transformers\.models\.(\w+)\.image_processing_(?!pil_)(\w+)$")


class _PilTwinLoader(importlib.abc.Loader):
    def __init__(self, twin: str):
        self.twin = twin

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        twin = importlib.import_module(self.twin)
        for name, value in vars(twin).items():
            if not name.startswith("__"):
                setattr(module, name, value)
            if name.endswith("Pil") and isinstance(value, type):
                setattr(module, name[: -len("Pil")], value)


class PilTwinFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        match = _TWIN.match(fullname)
        if match is None:
            return None
        twin = f"transformers.models.{match.group(1)}.image_processing_pil_{match.group(2)}"
        if importlib.util.find_spec(twin) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _PilTwinLoader(twin))


def install() -> None:
    if importlib.util.find_spec("torchvision") is not None:
        return
    if not any(isinstance(f, PilTwinFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PilTwinFinder())


install()
