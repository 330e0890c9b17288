"""Loaded at interpreter start on the lent GPU (the suite puts this folder on PYTHONPATH).

When GSPLAT_PRECOMPILED names a gsplat_cuda.so compiled by an earlier device run, register it as
``gsplat.csrc``: gsplat's backend imports that module first and only JIT-compiles its CUDA code
(75-100 s on a fresh machine) when the import fails. Same torch, gsplat and GPU architecture only.
"""

import importlib.machinery
import importlib.util
import os
import sys

_so = os.environ.get("GSPLAT_PRECOMPILED")
if _so and os.path.isfile(_so):
    try:
        import torch  # noqa: F401  (first: the extension links against torch's libraries)

        # For an extension module, module_from_spec is what loads the shared library.
        _loader = importlib.machinery.ExtensionFileLoader("gsplat_cuda", _so)
        _module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("gsplat_cuda", _so,
                                                                                         loader=_loader))
        _loader.exec_module(_module)
        sys.modules["gsplat.csrc"] = _module
    except Exception as error:  # a mismatched build: gsplat compiles its own as usual
        print(f"sitecustomize: precompiled gsplat not used ({error})", file=sys.stderr)
