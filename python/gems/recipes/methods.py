"""The fine-tuning methods of the search + recommendation benchmark, built the same way.

Every method trains the same model under the same rules, so what differs is the update rule alone:
- the new item rows of the (tied) embedding are trainable in every method, at the shared ``item_lr`` and
  without weight decay; the text-token rows stay frozen (a gradient mask; LoRA gets the same rows through
  PEFT's ``trainable_token_indices``), so no method can win or lose by rewriting the vocabulary;
- the task heads (:class:`gems.recipes.model.TaskHeads`: search an ``ItemHead``, rec a ``BilinearItemHead``)
  train at the shared head lrs (search ``head_lr``, rec its own: the recipe passes them as groups);
- the body (everything else) is trained at the method's own tuned ``lr``, AdamW betas (0.9, 0.999),
  eps 1e-6, weight decay 0.01 (the GEMS authors' values);
- GaLore's rank is GEMS' shared rank plus one task rank per task, so both methods optimise in subspaces
  of the same total dimension; both refresh their bases every ``gap`` steps with scale 1 (for a targeted
  weight scale and lr are one degree of freedom, and lr is tuned);
- ``galore_ns`` keeps every GaLore update of a protected weight in the same null space as GEMS
  (:class:`NullSpaceUpdate`), so the table separates what the null space adds from what the multi-subspace
  decomposition adds (``gems_nons`` is the other half of that comparison).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gems.resources import require

__all__ = ["METHODS", "MethodSpec", "NullSpaceUpdate", "build_method", "method_tasks", "method_packages"]

TASKS = ("search", "rec")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    optimizer: str        # adamw | lora | galore | gems
    tasks: tuple[str, ...]  # the tasks it trains on
    nullspace: bool = False
    about: str = ""


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("adamw", "adamw", TASKS, about="full fine-tuning, mixed batches, equal task weights"),
    MethodSpec("adamw_rec", "adamw", ("rec",), about="single-task AdamW on recommendation only"),
    MethodSpec("adamw_search", "adamw", ("search",), about="single-task AdamW on search only"),
    MethodSpec("lora", "lora", TASKS, about="PEFT LoRA on every decoder linear layer"),
    MethodSpec("galore", "galore", TASKS, about="galore-torch GaLoreAdamW"),
    MethodSpec("galore_ns", "galore", TASKS, nullspace=True, about="GaLore, updates kept in the GEMS null space"),
    MethodSpec("gems_nons", "gems", TASKS, about="GEMS without the null space"),
    MethodSpec("gems", "gems", TASKS, nullspace=True, about="GEMS: shared + per-task subspaces, null space"),
)}


# The optional package each optimizer kind imports (gems.resources.OPTIONAL says which extra installs it).
OPTIMIZER_PACKAGE = {"lora": "peft", "galore": "galore_torch"}


def method_tasks(name: str) -> tuple[str, ...]:
    return METHODS[name].tasks


def _feature(names: Sequence[str]) -> str:
    return f"method{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names)}"


def method_packages(names: Sequence[str]) -> dict[str, str]:
    """{optional package: what needs it ("method 'lora'")} for the methods ``names``, so a run can import
    them all before it trains anything."""
    users: dict[str, list[str]] = {}
    for name in names:
        module = OPTIMIZER_PACKAGE.get(METHODS[name].optimizer)
        if module is not None:
            users.setdefault(module, []).append(name)
    return {module: _feature(ms) for module, ms in users.items()}


@dataclass(frozen=True)
class Hyper:
    """The shared recipe hyper-parameters a method reads (the run's lr comes separately)."""

    item_lr: float
    head_lr: float = 3e-4
    weight_decay: float = 0.01
    rank: int = 32
    task_rank: int = 16
    gap: int = 25
    lora_r: int = 16
    refresh: str = "svd"
    moments: str = "fp32"  # "8bit": GEMS' inner AdamW keeps 8-bit moments (gems.AdamW8bit)
    seed: int = 0


class NullSpaceUpdate:
    """Keeps every update of the given weights in a null space, around any optimizer's ``step``.

    ``protect`` maps a weight to its protected basis Q and side; after the wrapped step the weight is reset
    to ``W_old + project_update(W_new - W_old)`` (the same projection GEMS applies to its own updates), so
    decay and moments of the wrapped optimizer are included and nothing of the update leaks into Q."""

    def __init__(self, optimizer: torch.optim.Optimizer, protect: Mapping[nn.Parameter, torch.Tensor], side: str):
        self.optimizer = optimizer
        self.protect = dict(protect)
        self.side = side

    def __getattr__(self, name: str) -> Any:  # everything else is the wrapped optimizer's
        return getattr(self.optimizer, name)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        from gems.nullspace import project_update

        before = {p: p.detach().clone() for p in self.protect}
        out = self.optimizer.step(closure)
        for p, q in self.protect.items():
            old = before[p]
            p.copy_(old + project_update(p - old, q, self.side))
        return out


def _embedding_name(model: nn.Module) -> str:
    emb = model.get_input_embeddings()
    for n, m in model.named_modules():
        if m is emb:
            return n.split(".")[-1]
    return "embed_tokens"


def _mask_text_rows(model: nn.Module, item_ids: Sequence[int]) -> nn.Parameter:
    """Freeze the text-token rows of the (tied) embedding by masking their gradient; returns the weight."""
    emb = model.get_input_embeddings().weight
    mask = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
    mask[torch.as_tensor(list(item_ids), device=emb.device)] = 1
    emb.register_hook(lambda g: g * mask)
    return emb


def _extra_groups(extra: Sequence[Any], hp: Hyper) -> list[dict[str, Any]]:
    """``extra`` as parameter groups without decay: parameters join one group at ``head_lr``; dicts (groups
    with their own ``lr``) are kept."""
    groups = [{"weight_decay": 0.0, **g, "params": list(g["params"])} for g in extra if isinstance(g, dict)]
    loose = [p for p in extra if not isinstance(p, dict)]
    if loose:
        groups.append({"params": loose, "lr": hp.head_lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _extra_numel(extra: Sequence[Any]) -> int:
    return sum(p.numel() for g in _extra_groups(extra, Hyper(item_lr=1.0)) for p in g["params"])


def _groups(body: list[nn.Parameter], items: list[nn.Parameter], lr: float, hp: Hyper,
            extra: Sequence[Any] = ()) -> list[dict[str, Any]]:
    return [{"params": body, "lr": lr, "weight_decay": hp.weight_decay},
            {"params": items, "lr": hp.item_lr, "weight_decay": 0.0}] + _extra_groups(extra, hp)


def _protected(model: nn.Module, nullspace: Any) -> dict[nn.Parameter, torch.Tensor]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name in nullspace:
            q = nullspace.basis(name)
            if q is not None:
                out[mod.weight] = q
    return out


def build_method(name: str, model: nn.Module, item_ids: Sequence[int], lr: float, hp: Hyper,
                 nullspace: Any = None, extra: Sequence[Any] = ()) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model to train, optimizer, info) for method ``name``; LoRA returns the PEFT-wrapped model.

    ``extra``: the item heads' parameters (one group at ``head_lr``) or parameter groups with their own
    ``lr`` (no decay either way)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    spec = METHODS[name]
    if spec.nullspace and nullspace is None:
        raise ValueError(f"method {name!r} needs a calibrated null space")
    # the method's own library first: without it nothing is built (the message names the extra)
    module = OPTIMIZER_PACKAGE.get(spec.optimizer)
    package = require(module, _feature([name])) if module is not None else None
    adam = dict(betas=(0.9, 0.999), eps=1e-6)
    info: dict[str, Any] = {}
    if spec.optimizer == "lora":
        lcfg = package.LoraConfig(r=hp.lora_r, lora_alpha=2 * hp.lora_r, lora_dropout=0.0,
                                  target_modules="all-linear", task_type="CAUSAL_LM",
                                  trainable_token_indices={_embedding_name(model): list(item_ids)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = package.get_peft_model(model, lcfg)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        items = [p for n, p in named if "trainable_tokens" in n]
        body = [p for n, p in named if "trainable_tokens" not in n]
        if not items or not body:
            raise RuntimeError("PEFT gave no trainable item rows or no LoRA weights")
        opt = torch.optim.AdamW(_groups(body, items, lr, hp, extra), **adam)
        info["trainable_params"] = sum(p.numel() for p in body + items) + _extra_numel(extra)
        return model, opt, info

    emb = _mask_text_rows(model, item_ids)
    body = [p for p in model.parameters() if p.requires_grad and p is not emb]
    items = [emb]
    info["trainable_params"] = sum(p.numel() for p in body) + len(item_ids) * emb.shape[1] + _extra_numel(extra)
    if spec.optimizer == "adamw":
        return model, torch.optim.AdamW(_groups(body, items, lr, hp, extra), **adam), info
    total_rank = hp.rank + len(TASKS) * hp.task_rank
    if spec.optimizer == "galore":
        from gems.targets import select_linear_modules

        targets = {id(m.weight) for _, m in select_linear_modules(model, None)}
        low = [p for p in body if id(p) in targets]
        rest = [p for p in body if id(p) not in targets]
        groups = _groups(rest, items, lr, hp, extra) + [
                  {"params": low, "lr": lr, "weight_decay": hp.weight_decay, "rank": total_rank,
                   "update_proj_gap": hp.gap, "scale": 1.0, "proj_type": "std"}]
        opt = package.GaLoreAdamW(groups, **adam, no_deprecation_warning=True)
        info["targeted_weights"] = len(low)
        if spec.nullspace:
            protect = {p: q for p, q in _protected(model, nullspace).items() if id(p) in targets}
            opt = NullSpaceUpdate(opt, protect, nullspace.protect_side)
            info["protected_weights"] = len(protect)
        return model, opt, info
    import gems

    inner_cls = gems.AdamW8bit if hp.moments == "8bit" else torch.optim.AdamW
    inner = inner_cls(_groups(body, items, lr, hp, extra), **adam)
    kw: dict[str, Any] = dict(model=model, tasks=list(TASKS), rank=hp.rank, task_rank=hp.task_rank,
                              update_proj_gap=hp.gap, scale=1.0, gating="heuristic", refresh=hp.refresh, seed=hp.seed)
    if spec.nullspace:
        kw.update(nullspace=nullspace, nullspace_mode="update")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gems.GemsOptimizer(inner, **kw)
    info["targeted_weights"] = len(opt.subspaces)
    return model, opt, info
