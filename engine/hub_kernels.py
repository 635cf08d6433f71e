"""No kernel from the Hugging Face hub runs in a CPT Studio process: ours or the libraries' own code.

    refuse_hub_kernels()    # engine/__init__.py calls it once, before anything imports transformers

Two doors are shut:
- transformers >= 5.25 kernelizes every model it loads (and again on `model.train()`) with layers
  fetched from the hub whenever the `kernels` package is installed. `USE_HUB_KERNELS=0` turns that
  off; it is inherited by the workers this process starts.
- bitsandbytes 0.50 ignores that variable: on a CPU with AVX512-BF16 it calls
  `kernels.get_kernel("kernels-community/quantization-bitsandbytes")` while it is imported, a
  download of compiled code from the hub (peft imports bitsandbytes when it is installed). So the
  `kernels` package's loaders are replaced, the moment that package is imported, by one that
  raises HubKernelRefused; bitsandbytes catches it and keeps its own CPU code.

Importing `kernels` here would pull in torch at engine import (the GUI's start-up); the loaders are
replaced through an import hook on `kernels` instead, or at once when it is already imported.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys

REFUSED = ("get_kernel", "get_locked_kernel", "load_kernel", "install_kernel")
REFUSAL = "CPT Studio runs no kernels from the Hugging Face hub"
# bitsandbytes logs a warning when its hub kernel fails to load; a refusal by design is no news
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class HubKernelRefused(RuntimeError):
    """A kernel from the Hugging Face hub was asked for; CPT Studio runs none."""


def refuse_hub_kernels() -> None:
    """Shut both doors (see the module docstring) for this process; calling it again is harmless."""
    os.environ["USE_HUB_KERNELS"] = "0"
    bnb_log = logging.getLogger(_BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropRefusal) for f in bnb_log.filters):
        bnb_log.addFilter(_DropRefusal())
    if "kernels" in sys.modules:
        _replace_loaders(sys.modules["kernels"])
    elif not any(isinstance(f, _KernelsImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _KernelsImportHook())


def _refused(*args, **kwargs):
    what = args[0] if args and isinstance(args[0], str) else "a hub kernel"
    raise HubKernelRefused(f"{REFUSAL} ({what} refused)")


class _DropRefusal(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return REFUSAL not in record.getMessage()


def _replace_loaders(module) -> None:
    for name in REFUSED:
        if hasattr(module, name):
            setattr(module, name, _refused)


class _KernelsImportHook(importlib.abc.MetaPathFinder):
    """Finds `kernels` with the other finders, and replaces its loaders right after it executes."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "kernels":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _LoadersReplaced(spec.loader)
        return spec


class _LoadersReplaced(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _replace_loaders(module)

    def __getattr__(self, name):   # resource readers and the like: the real loader's
        return getattr(self.loader, name)
