"""Import-time setup: find the Triton kernels, and remember how Triton decorated them.

Where the kernels live:

* an installed wheel (``pip install .``): ``bn_triton/kernels/`` inside the package folder;
* a clone of the repository (run from its root, or ``pip install -e .``): ``kernels/`` beside
  ``bn_triton/``. Running ``python -m bench`` or ``python -m bn_triton`` from the root of a clone
  imports the clone's ``bn_triton/`` (the current folder comes first on ``sys.path``), even where a
  wheel is installed too, so the clone's ``kernels/`` is loaded as ``bn_triton.kernels``: the code
  that runs is the clone's, all of it.

The kernel files import one another relatively (``from .tile import ...``), so they are always
loaded as the package ``bn_triton.kernels``; no top-level ``kernels`` module is ever imported (that
name belongs to another PyPI package).

``@triton.jit`` reads ``TRITON_INTERPRET`` once, when the kernels are decorated. ``load_kernels``
records the setting at that moment, so that switching the interpreter on later gives a clear error
(``interpreter_ready``) instead of Triton's "0 active drivers".
"""

import importlib
import importlib.util
import os
import sys

from bn_triton._config import interpreting

PACKAGE = __name__.rpartition(".")[0]  # "bn_triton"
KERNELS = PACKAGE + ".kernels"

# Whether Triton's interpreter was on when the kernels were decorated (set by load_kernels).
INTERPRETER_AT_IMPORT = False


def _repo_kernels(package_dir: str):
    """The ``kernels/`` folder of the bn_triton repository that holds ``package_dir``, or None."""
    root = os.path.dirname(package_dir)
    init = os.path.join(root, "kernels", "__init__.py")
    try:
        with open(os.path.join(root, "pyproject.toml"), encoding="utf-8") as f:
            ours = 'name = "bn_triton"' in f.read()
    except OSError:
        return None
    return os.path.dirname(init) if ours and os.path.isfile(init) else None


def _missing_kernels_error(package_dir: str, elsewhere: str) -> ImportError:
    other = f" (the bn_triton.kernels at {elsewhere} belongs to another copy of bn_triton)" if elsewhere else ""
    return ImportError(
        f"bn_triton was imported from {package_dir}, which has no Triton kernels: neither a kernels/ "
        "folder inside it (an installed wheel) nor the kernels/ folder of a bn_triton repository beside it "
        f"(a clone){other}. It is an incomplete copy of bn_triton, imported because its folder comes first on "
        "sys.path (with `python -m`, the current folder does). Run from the root of a complete clone, or "
        "from another folder to use an installed bn_triton (`pip install .` in the root of a complete clone "
        "installs it).",
        name=KERNELS,
    )


def load_kernels(package) -> None:
    """Import ``bn_triton.kernels`` (the wheel's folder or the clone's) and set it on ``package``."""
    global INTERPRETER_AT_IMPORT
    if KERNELS in sys.modules:  # imported before (a retried or reloaded bn_triton): decorated back then
        package.kernels = sys.modules[KERNELS]
        return
    INTERPRETER_AT_IMPORT = interpreting()
    package_dir = os.path.dirname(os.path.abspath(package.__file__))
    repo_kernels = None
    if not os.path.isfile(os.path.join(package_dir, "kernels", "__init__.py")):
        repo_kernels = _repo_kernels(package_dir)
    if repo_kernels is None:
        # An installed wheel, or a layout only an import hook knows (a zip, say). Kernels found anywhere
        # else (another copy's editable-install finder) would be another version of the code: refused.
        spec = importlib.util.find_spec(KERNELS)
        origin = os.path.abspath(spec.origin) if spec is not None and spec.origin else ""
        if not origin.startswith(os.path.join(package_dir, "")):
            raise _missing_kernels_error(package_dir, origin)
        package.kernels = importlib.import_module(KERNELS)
        return
    spec = importlib.util.spec_from_file_location(
        KERNELS, os.path.join(repo_kernels, "__init__.py"), submodule_search_locations=[repo_kernels]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[KERNELS] = module  # before running it: its relative imports look it up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for name in [n for n in sys.modules if n == KERNELS or n.startswith(KERNELS + ".")]:
            del sys.modules[name]
        raise
    package.kernels = module


def interpreter_ready() -> bool:
    """Called when the interpreter is on for a CPU tensor: True if the kernels were made for it.

    Raises a RuntimeError when TRITON_INTERPRET=1 (or ``triton.knobs.runtime.interpret``) was set
    after bn_triton was imported: the kernels were then compiled for a GPU, and Triton would fail
    with "0 active drivers".
    """
    if INTERPRETER_AT_IMPORT:
        return True
    raise RuntimeError(
        "bn_triton: Triton's interpreter (TRITON_INTERPRET=1) was switched on after bn_triton was imported, "
        "so its kernels were built for a GPU and cannot run on CPU tensors. Set TRITON_INTERPRET=1 before "
        "importing bn_triton: in the shell (`TRITON_INTERPRET=1 python ...`), or at the top of the script "
        "before any import. Without it, CPU tensors use torch's own batch_norm."
    )
