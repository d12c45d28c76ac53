"""``opt.param_groups`` and ``opt.state`` keyed by the model's parameters, as torch.optim users and tools expect.

The inner optimizer holds coordinate tensors in place of the targeted weights; torch tooling
(``torch.distributed.checkpoint``'s optimizer state dicts, LR schedulers, loggers) maps optimizer state to
the model through ``param_groups[i]["params"]``, so GemsOptimizer shows the model's parameters there and
forwards every other key (lr, weight_decay, ...) to the inner group it came from: a scheduler that writes
``group["lr"]`` writes the inner optimizer's lr."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from gems.optimizer import GemsOptimizer


class ParamGroupView(MutableMapping):
    """One inner param group with ``"params"`` = the model parameters it was built from (targeted weights
    included), in their original order."""

    def __init__(self, inner_group: dict[str, Any], params: list[Tensor]):
        self.inner_group = inner_group
        self._params = params

    def __getitem__(self, key: str) -> Any:
        return self._params if key == "params" else self.inner_group[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "params":
            raise TypeError("GemsOptimizer's param groups are fixed at construction: build a new optimizer "
                            "to change which parameters it trains")
        self.inner_group[key] = value

    def __delitem__(self, key: str) -> None:
        if key == "params":
            raise TypeError("a param group's 'params' cannot be removed")
        del self.inner_group[key]

    def __iter__(self) -> Iterator[str]:
        yield "params"
        yield from (k for k in self.inner_group if k != "params")

    def __len__(self) -> int:
        return len(self.inner_group)

    def __repr__(self) -> str:
        return f"ParamGroupView({ {k: v for k, v in self.inner_group.items() if k != 'params'} }, params={len(self._params)})"


class StateView(Mapping):
    """``opt.state[p]`` for a model parameter: a targeted weight's GEMS state (its step, schedule, bases and
    the inner optimizer's state of each of its coordinate tensors, gems.checkpoint.weight_state), or the
    inner optimizer's own state of any other parameter. Like torch's, it lists a parameter only once it has
    state (a targeted weight after its first step or load), so it is empty before the first step; a
    coordinate tensor (``w.coords[s]``) still reads its inner state."""

    def __init__(self, opt: "GemsOptimizer"):
        self._opt = opt

    def _targeted(self) -> dict[int, Any]:
        return {id(w.param): w for w in self._opt._subspaces}

    @staticmethod
    def _has_state(w) -> bool:
        return w.step > 0 or any(b is not None for b in w.bases.values())

    def __getitem__(self, p: Tensor) -> Any:
        from gems.checkpoint import weight_state
        w = self._targeted().get(id(p))
        if w is not None:
            return weight_state(self._opt, w)
        return self._opt.inner.state[p]

    def __contains__(self, p: object) -> bool:
        w = self._targeted().get(id(p))
        return self._has_state(w) if w is not None else p in self._opt.inner.state

    def __iter__(self) -> Iterator[Tensor]:
        opt = self._opt
        yield from (w.param for w in opt._subspaces if self._has_state(w))
        yield from (p for p in opt._plain_params if p in opt.inner.state)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        return next(iter(self), None) is not None
