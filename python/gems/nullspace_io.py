"""The null-space file: :meth:`gems.NullSpace.save` and :meth:`~gems.NullSpace.load` (one safetensors file of
bases and spectra with JSON metadata, written atomically, checked whole when read) and the format's name and
version. Separate from :mod:`gems.nullspace` so that the file format and every check on a file sit in one
place, apart from the math of the projections.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gems.errors import GemsError, MissingResourceError

if TYPE_CHECKING:
    from gems.nullspace import NullSpace

FORMAT_NAME = "gems.nullspace"
FORMAT_VERSION = 1
_SPECTRUM_PREFIX = "__spectrum__."


class NullSpaceFormatError(GemsError, ValueError):
    """A null-space file is not a gems null-space file, is corrupted, or has an unsupported format version."""


def metadata(ns: NullSpace) -> dict[str, str]:
    """The file's metadata: format, version, how ``ns`` was calibrated and a report entry per module."""
    rep = ns.report()
    modules = {}
    for name, r in rep.items():
        entry = dict(r)
        if name in ns._shapes:
            entry["weight_shape"] = list(ns._shapes[name])
        spec = ns._spectra.get(name)
        entry["eigenvalues"] = 0 if spec is None else int(spec.numel())
        modules[name] = entry
    from gems.version import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "gems_version": str(__version__),
        "side": ns.side,
        "mode": json.dumps(ns.mode),
        "threshold": json.dumps(ns.threshold),
        "accumulate_dtype": json.dumps(ns.accumulate_dtype),
        "modules": json.dumps(modules),
    }


def save(ns: NullSpace, path: str | os.PathLike) -> Path:
    """:meth:`gems.NullSpace.save` (documented there)."""
    from safetensors.torch import save as st_save

    path = Path(path)
    tensors = {name: q.detach().cpu().contiguous() for name, q in ns._bases.items()}
    for name, spec in ns._spectra.items():
        tensors[_SPECTRUM_PREFIX + name] = spec.detach().cpu().contiguous()
    data = st_save(tensors, metadata=metadata(ns))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load(cls: type[NullSpace], path: str | os.PathLike, *, device: torch.device | str = "cpu") -> NullSpace:
    """:meth:`gems.NullSpace.load` (documented there); ``cls`` is the class to build."""
    from safetensors.torch import load as st_load

    path = Path(path)
    if not path.is_file():
        raise MissingResourceError(f"null-space file not found: {path}")
    raw = path.read_bytes()
    try:
        tensors = st_load(raw)
        if len(raw) < 8:
            raise ValueError("file too short")
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len].decode("utf-8"))
        meta = header.get("__metadata__") or {}
    except Exception as exc:  # safetensors raises its own error types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NullSpaceFormatError(f"cannot read null-space file {path}: corrupted or not safetensors "
                                   f"({msg})") from None
    if meta.get("format") != FORMAT_NAME:
        raise NullSpaceFormatError(f"{path} is not a gems null-space file (metadata format="
                                   f"{meta.get('format')!r}, expected {FORMAT_NAME!r})")
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise NullSpaceFormatError(f"{path} has null-space format version {version!r}; this gems reads "
                                   f"version {FORMAT_VERSION}")
    try:
        side = meta["side"]
        mode = json.loads(meta["mode"])
        threshold = json.loads(meta["threshold"])
        acc_dtype = json.loads(meta.get("accumulate_dtype", "null"))
        modules = json.loads(meta["modules"])
    except (KeyError, ValueError) as exc:
        raise NullSpaceFormatError(f"{path} has malformed null-space metadata ({exc})") from None
    bases, spectra, samples, shapes = {}, {}, {}, {}
    for name, info in modules.items():
        q = tensors.get(name)
        if q is None:
            raise NullSpaceFormatError(f"{path} lists module {name!r} but holds no basis for it")
        if q.dim() != 2 or list(q.shape) != [info.get("total_dim"), info.get("protected_dim")]:
            raise NullSpaceFormatError(f"{path}: basis of module {name!r} has shape {tuple(q.shape)}, "
                                       f"metadata says {info.get('total_dim')}×{info.get('protected_dim')}")
        if q.dtype != torch.float32:  # save() always writes fp32
            raise NullSpaceFormatError(f"{path}: basis of module {name!r} is {q.dtype}, expected torch.float32")
        problem = cls._basis_problem(q)
        if problem:
            raise NullSpaceFormatError(f"{path}: basis of module {name!r} {problem}; the file is corrupted "
                                       f"or was edited")
        bases[name] = q.to(device)
        spec = tensors.get(_SPECTRUM_PREFIX + name)
        if spec is not None:
            n_eig = info.get("eigenvalues", spec.numel())
            if spec.dim() != 1 or not spec.is_floating_point() or spec.numel() != n_eig:
                raise NullSpaceFormatError(f"{path}: spectrum of module {name!r} is a {spec.dtype} tensor of "
                                           f"shape {tuple(spec.shape)}, metadata says {n_eig} eigenvalues")
            spectra[name] = spec
        samples[name] = int(info.get("samples", 0))
        if "weight_shape" in info:
            shapes[name] = info["weight_shape"]
    try:
        return cls(bases, side=side, threshold=threshold, mode=mode, spectra=spectra, samples=samples,
                   shapes=shapes, accumulate_dtype=acc_dtype, check=False)
    except ValueError as exc:
        raise NullSpaceFormatError(f"{path}: {exc}") from None
