"""Which weights GEMS projects: every nn.Linear but the LM head, unless the user says otherwise."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

TargetSpec = None | str | Sequence[str] | Callable[[str, nn.Module], bool]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP/FSDP-style wrappers that keep it as ``.module``."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return model


def _is_lm_head(name: str, module: nn.Module, embedding_weights: set[int]) -> bool:
    return name.split(".")[-1] == "lm_head" or id(module.weight) in embedding_weights


def _matcher(spec: TargetSpec) -> Callable[[str, nn.Module], bool]:
    if callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"target_modules must be None, a name pattern, a list of them or a callable, got {spec!r}")
    compiled = [re.compile(p) for p in patterns]
    return lambda name, module: any(c.search(name) for c in compiled)


def select_linear_modules(model: nn.Module, spec: TargetSpec = None) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the target nn.Linear layers, in ``named_modules`` order.

    ``spec`` None or ``"all-linear"``: every nn.Linear except an LM head (named ``lm_head`` or tied to an input
    embedding).
    A string or list of strings: regular expressions searched in module names. A callable: (name, module)
    -> bool. A spec that matches no Linear raises, since silently training nothing is the worst outcome."""
    model = unwrap(model)
    if isinstance(spec, str) and spec.replace("_", "-") == "all-linear":  # PEFT's name for the default
        spec = None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if spec is None:
        chosen = [(n, m) for n, m in linears if not _is_lm_head(n, m, embedding_weights)]
    else:
        match = _matcher(spec)
        chosen = [(n, m) for n, m in linears if match(n, m)]
    if not chosen:
        names = ", ".join(n for n, _ in linears[:8]) or "none"
        raise ValueError(f"target_modules={spec!r} matches no nn.Linear in the model (Linear layers: {names}...)")
    return chosen


def named_parameters_by_id(params: Iterable) -> dict[int, str]:
    return {id(p): n for n, p in params}
