"""GEMS in the Hugging Face ``transformers.Trainer``: :class:`GemsTrainer`.

Each training batch carries a task column (``task_column``, default ``"task"``) holding, per row, a task
name (a list of strings) or a task index into ``tasks`` (an integer tensor). The trainer computes one loss
per task from the model's logits (token-mean cross-entropy of the causal-LM ``labels`` of that task's
rows) and hands them to :meth:`gems.GemsOptimizer.backward` with per-task sample counts, instead of the
accelerator's ``backward`` (GEMS needs each task's gradient separately).

Example::

    trainer = GemsTrainer(model=model, args=TrainingArguments(..., optim="adamw_torch",
                                                              remove_unused_columns=False),
                          train_dataset=ds, data_collator=collate, tasks=["search", "rec"],
                          gems_kwargs=dict(rank=64, task_rank=32, update_proj_gap=200, nullspace=ns))
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

What it overrides and why
    * ``create_optimizer``: builds the inner optimizer the usual way (``args.optim``, learning rate,
      weight-decay groups) — or takes the one passed as ``optimizers=(inner, None)`` or ``inner_optimizer=``
      — and wraps it in :class:`gems.GemsOptimizer` (``gems_kwargs`` are its options). Schedulers from
      ``create_scheduler`` attach to the GEMS optimizer (its ``param_groups`` write the inner's).
    * ``training_step``: one forward over the mixed batch and one backward for all tasks
      (``opt.backward(row_losses, task_ids=..., row_weights=label tokens)``, see gems.split_backward);
      ``one_backward=False``, or targeted weights that cannot be split by rows (``target_embeddings=True``),
      fall back to per-task losses and one autograd pass per task. Returns the (detached) loss for
      logging. The accelerator's backward is bypassed, so this trainer supports single-process CPU/GPU
      training and DDP (``accelerate launch`` / ``torchrun``) through GEMS' own sample-weighted gradient
      sync, with DDP's reducer held off by ``no_sync`` (not DeepSpeed, FSDP or fp16 loss scaling; bf16
      autocast via ``args.bf16`` works, there is no loss scaler to bypass).
    * Gradient accumulation is exact (with GA > 1 the trainer picks ``stash="full"`` unless ``gems_kwargs``
      sets one: the projected stash estimates norms across micro-batches): each micro-batch's task loss is its
      token mean and its weight its label tokens, so ``opt.backward`` makes each task's gradient its token-weighted mean over the window
      and the shared gradient Σ_t (N_t/N)·G_t the gradient of the mixed window's token-mean loss — what the
      plain Trainer computes. ``get_batch_samples`` counts the window's tokens only to scale the logged loss.
    * Gradient clipping (``args.max_grad_norm > 0``): GEMS keeps the task gradients in its stash, not in
      ``.grad``, so ``_clip_grad_norm`` measures the norm of the **shared** gradient Σ_t w_t·G_t over
      all parameters (the gradient a plain mixed-batch Trainer would clip) and, if it exceeds the limit,
      multiplies every stashed task gradient by the same factor. The shared gradient is clipped exactly as
      the plain Trainer would clip it, and the ratios between tasks (hence the gates' gradient-norm shares)
      are unchanged. The logged ``grad_norm`` is that shared-gradient norm before clipping. Under DDP both
      are the global gradient's (the stash is averaged across ranks first), as in one process.
    * Diagnostics (opt-in, ``log_diagnostics=True``): on every optimizer step that will be logged,
      ``opt.diagnostics()`` is read between backward and step and merged into the next log entry, as
      ``gems/<key>``. ``diagnostics="summary"`` (default) logs the mean over targeted layers of each
      metric (``gems/cos/search-rec``, ``gems/conflict``, energies, angles) plus the gates;
      ``"full"`` logs every per-layer key.
    * Checkpoints: the optimizer state goes through ``opt.state_dict()`` (tensors and plain values, loads
      with ``weights_only=True``); the Trainer's own save/resume of weights, scheduler and RNG does the
      rest. Resuming on CPU reproduces an uninterrupted run bit for bit (tested).
    * The task column is kept through ``remove_unused_columns`` and removed before the forward. A
      collator that drops it or cannot batch it (transformers' ``default_data_collator`` skips strings,
      tokenizer padding fails on them) gets the batch without it, and the column is added back as a list:
      no custom collator is needed (:class:`TaskColumnCollator`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gems.config import GemsConfig
from gems.optimizer import GemsOptimizer
from gems.resources import require
from gems.split_backward import row_losses, row_nll

Trainer = require("transformers", "gems.integrations.transformers (GemsTrainer)").Trainer

__all__ = ["GemsTrainer", "TaskColumnCollator", "gems_options_from_args", "row_losses", "task_losses"]

logger = logging.getLogger(__name__)

# GemsConfig options whose value is not its default's type (None by default)
_NULLABLE = {"task_rank": int, "adaptive_refresh": float, "backend": str}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _option_value(key: str, text: str) -> Any:
    """``text`` (from an ``optim_args`` string) as the type of GemsConfig option ``key``."""
    default = {f.name: f.default for f in dataclasses.fields(GemsConfig)}[key]
    kind = _NULLABLE.get(key, type(default))
    if key in _NULLABLE and text.lower() == "none":
        return None
    try:
        if kind is bool:
            return _BOOLS[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        raise ValueError(f"optim_args: {key}={text!r} is not a valid {kind.__name__}") from None


def _hf_target_matcher(spec: str | Sequence[str]):
    """transformers' meaning of ``optim_target_modules`` (as for its GaLore/APOLLO optimizers): a string is a
    regex the whole module name must match; a list matches a name equal to an entry, containing one, or fully
    matching one as a regex."""
    if isinstance(spec, str):
        return lambda name, module: re.fullmatch(spec, name) is not None
    entries = list(spec)
    return lambda name, module: any(e == name or e in name or re.fullmatch(e, name) is not None for e in entries)


def gems_options_from_args(args: Any, gems_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``gems_kwargs`` completed from the ``TrainingArguments`` conventions of transformers' low-rank optimizers:
    ``optim_target_modules`` (a list of names, a regex, or ``"all-linear"``) gives ``target_modules``, and the
    GEMS options in ``optim_args`` (``"rank=64,task_rank=32,update_proj_gap=200,scale=0.25"``) give keyword
    options. ``"all-linear"`` means gems' default, every ``nn.Linear`` but the LM head (as in PEFT; a tied head
    is the embedding). An option given both ways must agree; ``optim_args`` keys that are not GEMS options are
    left to transformers' optimizer setup (logged)."""
    out = dict(gems_kwargs or {})
    target = getattr(args, "optim_target_modules", None)
    if target is not None:
        if not isinstance(target, (str, list, tuple)) or not target:
            raise ValueError(f"optim_target_modules must be a list of names, a regex or 'all-linear', got {target!r}")
        if "target_modules" in out:
            raise ValueError("target_modules is set in gems_kwargs and as TrainingArguments.optim_target_modules: "
                             "give it once")
        all_linear = isinstance(target, str) and target.replace("_", "-") == "all-linear"
        out["target_modules"] = None if all_linear else _hf_target_matcher(target)
    text = getattr(args, "optim_args", None) or ""
    options = {f.name for f in dataclasses.fields(GemsConfig)} - {"tasks", "gating"}
    others = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"optim_args must be 'key=value' pairs separated by commas, got {item!r} in {text!r}")
        if key not in options:
            others.append(key)
            continue
        parsed = _option_value(key, value)
        if key in out and out[key] != parsed:
            raise ValueError(f"{key} is {out[key]!r} in gems_kwargs and {parsed!r} in optim_args: give it once")
        out[key] = parsed
    if others:
        logger.warning("optim_args %s are not GEMS options; they are left to transformers' optimizer setup "
                       "(which ignores them for AdamW). GEMS options: %s", others, ", ".join(sorted(options)))
    return out


def _task_index(value: Any, tasks: Sequence[str], n: int) -> Tensor:
    """Per-row task index (LongTensor on the CPU) from a list of names or an integer tensor/list."""
    if isinstance(value, Tensor):
        idx = value.detach().reshape(-1).to("cpu", torch.long)
    else:
        vals = list(value)
        if vals and isinstance(vals[0], str):
            pos = {t: i for i, t in enumerate(tasks)}
            unknown = sorted({v for v in vals if v not in pos})
            if unknown:
                raise ValueError(f"unknown task name(s) {unknown} in the task column; tasks are {list(tasks)}")
            idx = torch.tensor([pos[v] for v in vals], dtype=torch.long)
        else:
            idx = torch.tensor([int(v) for v in vals], dtype=torch.long)
    if idx.numel() != n:
        raise ValueError(f"task column has {idx.numel()} entries for a batch of {n} rows")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(tasks)):
        raise ValueError(f"task ids must be in [0, {len(tasks)}), got {idx.tolist()}")
    return idx


class TaskColumnCollator:
    """Wraps a data collator so that each batch keeps the rows' task column (names or ids, as a list).

    The wrapped collator is tried on the features as they are (a custom one may batch the column itself);
    when its batch lacks the column, or it raises on it, it collates the features without the column and
    the column's values are attached to its batch. Once that was needed, later batches go straight to it
    (each batch is collated once)."""

    def __init__(self, collator: Any, column: str):
        self.collator, self.column = collator, column
        self.strip = False  # learnt from the first batch the collator could not keep the column of

    def __call__(self, features: Sequence[Any]) -> Any:
        if not features or not isinstance(features[0], Mapping) or self.column not in features[0]:
            return self.collator(features)
        values = [f[self.column] for f in features]
        batch = None
        if not self.strip:
            try:
                batch = self.collator(features)
            except (TypeError, ValueError):  # e.g. a tokenizer's pad, which turns every column into a tensor
                batch = None
        if batch is None or self.column not in batch:
            self.strip = True
            batch = self.collator([{k: v for k, v in f.items() if k != self.column} for f in features])
            batch[self.column] = values
        return batch


def _shifted_labels(labels: Tensor) -> Tensor:
    return labels[:, 1:]


def task_losses(logits: Tensor, labels: Tensor, task_idx: Tensor, tasks: Sequence[str],
                denominators: Mapping[str, float] | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Per-task causal-LM losses: Σ token NLL of the task's rows / ``denominators[task]`` (default: the
    task's label-token count in this batch), and the label-token count per task. A task with no row gets
    a zero loss that still depends on the logits (so ``opt.backward`` sees a graph) and count 0."""
    per_row_sum, per_row_count = row_nll(logits, labels)
    task_idx = task_idx.to(per_row_sum.device)
    losses: dict[str, Tensor] = {}
    counts: dict[str, float] = {}
    for i, t in enumerate(tasks):
        rows = task_idx == i
        n = float(per_row_count[rows].sum()) if bool(rows.any()) else 0.0
        counts[t] = n
        den = float(denominators[t]) if denominators is not None else n
        if n == 0 or den == 0:
            losses[t] = logits[:, :-1].float().sum() * 0.0
        else:
            losses[t] = per_row_sum[rows].sum() / den
    return losses, counts


class GemsTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with :class:`gems.GemsOptimizer` on per-task losses.

    Extra keyword arguments (all keyword-only, everything else goes to ``Trainer``):

    * ``tasks``: task names (order = the ids a task column may hold); required.
    * ``task_column``: batch key with each row's task (names or ids); default ``"task"``.
    * ``gems_kwargs``: options of :class:`gems.GemsOptimizer` (rank, task_rank, update_proj_gap, scale,
      gating, nullspace, ...); ``model`` and ``tasks`` are filled in. ``TrainingArguments.optim_target_modules``
      and the GEMS options in ``optim_args`` are read too, as transformers' GaLore reads them
      (:func:`gems_options_from_args`).
    * ``inner_optimizer``: an optimizer instance over the model's parameters to wrap instead of the one
      ``args.optim`` would build (``optimizers=(inner, scheduler)`` works too).
    * ``log_diagnostics`` / ``diagnostics``: see the module docstring.
    * ``one_backward`` (default True): one forward and one backward for all tasks; False: one per task.
    """

    def __init__(self, *args: Any, tasks: Sequence[str], task_column: str = "task",
                 gems_kwargs: Mapping[str, Any] | None = None, inner_optimizer: torch.optim.Optimizer | None = None,
                 log_diagnostics: bool = False, diagnostics: str = "summary", one_backward: bool = True,
                 **kwargs: Any) -> None:
        if isinstance(tasks, str) or not tasks:
            raise ValueError("tasks must be a non-empty list of task names, e.g. ['search', 'rec']")
        if diagnostics not in ("summary", "full"):
            raise ValueError(f"diagnostics must be 'summary' or 'full', got {diagnostics!r}")
        self.gems_tasks = list(tasks)
        self.task_column = task_column
        self.gems_kwargs = dict(gems_kwargs or {})
        for key in ("model", "tasks"):
            if key in self.gems_kwargs:
                raise ValueError(f"gems_kwargs must not set {key!r}; GemsTrainer fills it in")
        self.inner_optimizer = inner_optimizer
        self.log_diagnostics = bool(log_diagnostics)
        self.diagnostics_mode = diagnostics
        self.one_backward = bool(one_backward)
        self._gems_window: dict[str, float] | None = None
        self._gems_window_left = 0
        self._gems_pending_logs: dict[str, float] = {}
        super().__init__(*args, **kwargs)
        self.data_collator = TaskColumnCollator(self.data_collator, task_column)

    # ------------------------------------------------------------------------------------------ optimizer
    @property
    def gems_optimizer(self) -> GemsOptimizer | None:
        """The :class:`GemsOptimizer` (unwrapped from accelerate's ``AcceleratedOptimizer``), or None."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, GemsOptimizer):
            opt = getattr(opt, "optimizer", None)
        return opt

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        # checked before transformers reads optim_args for the inner optimizer (its errors say less)
        kwargs = gems_options_from_args(self.args, self.gems_kwargs)
        if self.optimizer is None and self.inner_optimizer is not None:
            self.optimizer = self.inner_optimizer
        if self.optimizer is None:
            super().create_optimizer(model)
        if not isinstance(self.optimizer, GemsOptimizer):
            if "stash" not in kwargs and self.args.gradient_accumulation_steps > 1:
                # projected coordinates estimate ‖G_t‖ across micro-batches (gates, clipping): keep accumulation
                # exact unless the user asks for the projected stash
                kwargs["stash"] = "full"
            self.optimizer = GemsOptimizer(self.optimizer, model=opt_model, tasks=self.gems_tasks, **kwargs)
        return self.optimizer

    # ------------------------------------------------------------------------------------------ columns
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and self.task_column not in self._signature_columns:
            self._signature_columns.append(self.task_column)

    # ------------------------------------------------------------------------------------------ accumulation
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        window = {t: 0.0 for t in self.gems_tasks}
        for b in batch_samples:
            if not isinstance(b, Mapping) or "labels" not in b or self.task_column not in b:
                window = None
                break
            labels = b["labels"]
            idx = _task_index(b[self.task_column], self.gems_tasks, labels.shape[0])
            per_row = (_shifted_labels(labels) != -100).sum(1).cpu()
            for i, t in enumerate(self.gems_tasks):
                window[t] += float(per_row[idx == i].sum())
        self._gems_window = window
        self._gems_window_left = len(batch_samples)
        return batch_samples, num_items

    # ------------------------------------------------------------------------------------------ step
    def compute_task_losses(self, model: nn.Module, inputs: dict[str, Any]
                            ) -> tuple[dict[str, Tensor], dict[str, float], Tensor]:
        """Per-task token-mean losses of this micro-batch, its per-task label tokens, and the micro-batch's
        share of the accumulation window's mixed token-mean loss (for logging)."""
        inputs, idx, labels = self._split_inputs(inputs)
        logits = self._logits(model, inputs)
        # opt.backward takes each micro-batch's per-token mean losses with their token counts and averages
        # over the accumulation window itself, weighting by the counts; the window only scales the logged loss
        losses, counts = task_losses(logits, labels, idx, self.gems_tasks)
        return losses, counts, self._logged(sum(l.detach() * counts[t] for t, l in losses.items()), counts)

    def _split_inputs(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], Tensor, Tensor]:
        """The model's inputs without the task column and labels, each row's task index, and the labels."""
        inputs = dict(inputs)
        if self.task_column not in inputs:
            raise KeyError(f"GemsTrainer needs a {self.task_column!r} column in every batch (task names or ids)")
        task_value = inputs.pop(self.task_column)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise KeyError("GemsTrainer needs 'labels' in every batch (causal-LM labels, -100 = ignored)")
        return inputs, _task_index(task_value, self.gems_tasks, labels.shape[0]), labels

    def _logits(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
        return outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]

    def _logged(self, token_sum: Tensor, counts: Mapping[str, float]) -> Tensor:
        """This micro-batch's share of the window's mixed token-mean loss."""
        window = self._gems_window if self._gems_window is not None and self._gems_window_left > 0 else counts
        return token_sum / (sum(window.values()) or 1.0)

    def _one_backward(self, opt: GemsOptimizer, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """One forward, one backward for all tasks (opt.backward(row_losses, task_ids=...)); the per-row
        losses weighted by their label tokens give the same task gradients as the per-task form. Returns the
        logged loss."""
        inputs, idx, labels = self._split_inputs(inputs)
        per_row, count = row_losses(self._logits(model, inputs), labels)
        if float(count.sum()) > 0:
            opt.backward(per_row, task_ids=idx.to(per_row.device), row_weights=count)
        counts = {t: float(count[idx.to(count.device) == i].sum()) for i, t in enumerate(self.gems_tasks)}
        return self._logged((per_row.detach() * count).sum(), counts)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        opt = self.gems_optimizer
        if opt is None:
            raise RuntimeError("GemsTrainer.training_step needs the GEMS optimizer; call create_optimizer first")
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        # under DDP (accelerate launch) gems averages its own stash across ranks, weighted by each rank's
        # samples, at the step (or when clipping needs the global norm): DDP's reducer would only repeat the
        # traffic for the other parameters, unweighted
        with self.accelerator.no_sync(model):
            if self.one_backward and all(id(w.param) in opt._row_split for w in opt.subspaces):
                mixed = self._one_backward(opt, model, inputs)
            else:  # one forward and one autograd pass per task (the reference path)
                losses, counts, mixed = self.compute_task_losses(model, inputs)
                if sum(counts.values()) > 0:
                    opt.backward(losses, num_samples=counts)
        if self._gems_window_left > 0:
            self._gems_window_left -= 1
        if self.log_diagnostics and self.accelerator.sync_gradients and self._will_log_next_step():
            self._gems_pending_logs = self._diagnostics(opt)
        if self._gems_window is None:  # outside the window bookkeeping: HF's equal micro-batch weighting
            mixed = mixed / getattr(self, "current_gradient_accumulation_steps", 1)
        return mixed.detach()

    def _will_log_next_step(self) -> bool:
        step = self.state.global_step + 1
        if self.args.logging_strategy == "no":
            return False
        if self.args.logging_strategy == "steps":
            every = self.args.logging_steps
            every = max(1, math.ceil(every * self.state.max_steps)) if 0 < every < 1 else max(1, int(every))
            return step % every == 0 or step == self.state.max_steps or (step == 1 and self.args.logging_first_step)
        return True  # epoch logging: keep the latest

    def _diagnostics(self, opt: GemsOptimizer) -> dict[str, float]:
        flat = opt.diagnostics()
        if self.diagnostics_mode == "full":
            return {f"gems/{k}": v for k, v in flat.items()}
        groups: dict[str, list[float]] = {}
        out: dict[str, float] = {}
        for k, v in flat.items():
            if k.startswith("gate/"):
                out[f"gems/{k}"] = v
                continue
            metric = k.split("/", 1)[1] if "/" in k else k
            if math.isfinite(v):
                groups.setdefault(metric, []).append(v)
        for metric, vals in sorted(groups.items()):
            out[f"gems/{metric}"] = sum(vals) / len(vals)
        return out

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._gems_pending_logs and "loss" in logs:
            logs = {**logs, **self._gems_pending_logs}
            self._gems_pending_logs = {}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------------------------------ clipping
    def _clip_grad_norm(self, model: nn.Module):
        if self.gems_optimizer is None:
            return super()._clip_grad_norm(model)
        return self.gems_optimizer.clip_grad_norm_(float(self.args.max_grad_norm))

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None):
        if self.gems_optimizer is None:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is None:
            grad_norm = torch.tensor(self.gems_optimizer.shared_grad_norm())
        return grad_norm
