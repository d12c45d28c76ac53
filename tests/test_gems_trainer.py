"""GemsTrainer (transformers.Trainer integration) on a tiny Llama: trains, accumulates, clips, logs, resumes."""
import math
import os
import warnings

import pytest
import torch
from torch import Tensor

from conftest import require  # noqa: E402

transformers = require("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from gems import GemsOptimizer  # noqa: E402
from gems.integrations.transformers import GemsTrainer, task_losses  # noqa: E402

TASKS = ["search", "rec"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matrices: one thread avoids OpenMP oversubscription on shared cores (10x faster here)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
VOCAB = 64


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


class TinyTasks(torch.utils.data.Dataset):
    """Two tasks with different deterministic patterns: search counts up by 1, rec by 3 (mod 60)."""

    def __init__(self, n=32, length=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            task = i % 2
            start = int(torch.randint(4, VOCAB, (1,), generator=g))
            step = 1 if task == 0 else 3
            ids = [(start - 4 + k * step) % (VOCAB - 4) + 4 for k in range(length - (i % 3))]
            self.rows.append((ids, task))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids, task = self.rows[i]
        return {"input_ids": ids, "task": TASKS[task]}


def collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task": [r["task"] for r in rows]}


def make_trainer(tmp_path, *, steps=12, bs=8, ga=1, seed=0, save_steps=None, max_grad_norm=0.0,
                 log_diagnostics=False, model=None, logging_steps=4, gems_kwargs=None, one_backward=True, args_kw=None,
                 base_gems_kwargs=None):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
        learning_rate=3e-3, weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=2, optim="adamw_torch",
        logging_steps=logging_steps, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=[], seed=seed, data_seed=seed, use_cpu=True, max_grad_norm=max_grad_norm,
        dataloader_num_workers=0, disable_tqdm=True, **(args_kw or {}),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GemsTrainer(model=model or tiny_model(seed), args=args, train_dataset=TinyTasks(), data_collator=collate,
                           tasks=TASKS, gems_kwargs=dict(base_gems_kwargs if base_gems_kwargs is not None else
                                                         dict(rank=4, task_rank=2, update_proj_gap=5), **(gems_kwargs or {})),
                           log_diagnostics=log_diagnostics, one_backward=one_backward)


def mean_loss(model, ds):
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return float(out.loss)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trains_and_uses_gems(tmp_path):
    trainer = make_trainer(tmp_path, steps=12)
    held_out = TinyTasks(seed=1)  # the same two patterns from other starts: not seen in training
    before = mean_loss(trainer.model, held_out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert isinstance(trainer.gems_optimizer, GemsOptimizer)
    after = mean_loss(trainer.model, held_out)
    assert after < before - 0.3, (before, after)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(math.isfinite(h["loss"]) for h in logged)
    # the scheduler drives the GEMS optimizer's (= inner's) learning rate: warm-up to 3e-3, then cosine down
    assert trainer.lr_scheduler.optimizer.param_groups is trainer.gems_optimizer.param_groups
    lrs = [h["learning_rate"] for h in logged]
    assert len(lrs) == 3 and 3e-3 > lrs[0] > lrs[1] > lrs[2] >= 0, lrs
    assert trainer.gems_optimizer.param_groups[0]["lr"] == pytest.approx(trainer.lr_scheduler.get_last_lr()[0])


def test_task_losses_window_normalisation():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (4, 5))
    labels[1, 3:] = -100
    idx = torch.tensor([0, 1, 0, 1])
    losses, counts = task_losses(logits, labels, idx, TASKS)
    assert counts == {"search": 8.0, "rec": 6.0}
    # the mixed batch's token-mean loss = Σ_t (N_t / N) · loss_t
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    mixed = sum(losses[t] * counts[t] / 14 for t in TASKS)
    assert float(mixed) == pytest.approx(float(ref), rel=1e-6)
    # a task with no row gives a zero loss that still has a graph
    losses, counts = task_losses(logits, labels, torch.zeros(4, dtype=torch.long), TASKS)
    assert counts["rec"] == 0 and float(losses["rec"]) == 0.0 and losses["rec"].requires_grad


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """GA 2 × batch 4 gives the same weights as batch 8 (same samples, exact per-task window means)."""
    t1 = make_trainer(tmp_path / "a", steps=4, bs=8, ga=1)
    t2 = make_trainer(tmp_path / "b", steps=4, bs=4, ga=2)
    w0 = weights(t1.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1.train()
        t2.train()
    w1, w2 = weights(t1.model), weights(t2.model)
    assert set(w1) == set(w2) == set(w0)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=2e-4, atol=2e-6, msg=k)
    assert sum(not torch.equal(w1[k], w0[k]) for k in w0) == len(w0)  # both trained: every tensor moved
    l1 = [h["loss"] for h in t1.state.log_history if "loss" in h]
    l2 = [h["loss"] for h in t2.state.log_history if "loss" in h]
    assert len(l1) == len(l2) == 1  # logging_steps=4 over 4 steps
    assert l1 == pytest.approx(l2, rel=1e-4)


@pytest.mark.parametrize("stash", ["full", "projected"])
def test_one_backward_matches_one_pass_per_task(tmp_path, stash):
    """The default (one forward, one backward, rows weighted by label tokens) trains the same weights as the
    per-task path, with GA 2 over padded rows of unequal lengths and a refresh every 5 steps."""
    runs = []
    for one in (True, False):
        t = make_trainer(tmp_path / str(one), steps=6, bs=4, ga=2, one_backward=one, gems_kwargs={"stash": stash})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.train()
        runs.append(t)
    a, b = weights(runs[0].model), weights(runs[1].model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-4, atol=2e-6, msg=k)
    la = [h["loss"] for h in runs[0].state.log_history if "loss" in h]
    lb = [h["loss"] for h in runs[1].state.log_history if "loss" in h]
    assert la == pytest.approx(lb, rel=1e-4)
    assert runs[0].gems_optimizer._task_grads.form is None  # consumed by the step


def test_projected_stash_under_the_trainer(tmp_path):
    """stash="projected" gives the default's weights with one micro-batch per step (no clipping: the projected
    stash estimates the clip norm), and trains with GA 2 and clipping."""
    runs = {}
    for name, ga, kw in (("full", 1, {}), ("projected", 1, {"stash": "projected"}),
                         ("projected_ga", 2, {"stash": "projected", "refresh_schedule": "staggered"})):
        t = make_trainer(tmp_path / name, steps=6, bs=8 // ga, ga=ga, max_grad_norm=1.0 if ga > 1 else 0.0,
                         gems_kwargs=kw)
        before = mean_loss(t.model, TinyTasks(seed=1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.train()
        runs[name] = (weights(t.model), before, mean_loss(t.model, TinyTasks(seed=1)))  # held-out rows
    for k, v in runs["full"][0].items():
        torch.testing.assert_close(runs["projected"][0][k], v, rtol=1e-3, atol=1e-5, msg=k)
    assert runs["projected_ga"][2] < runs["projected_ga"][1] - 0.1


def test_diagnostics_logging(tmp_path):
    trainer = make_trainer(tmp_path, steps=4, log_diagnostics=True, logging_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    # the default one-backward form keeps coordinates only: the cosine is measured in the shared subspace
    assert all("gems/cos_shared/search-rec" in h and "gems/gate/search" in h for h in logs)
    assert all(-1.0 <= h["gems/cos_shared/search-rec"] <= 1.0 for h in logs)
    assert all(h["grad_norm"] > 0 for h in logs)  # the shared-gradient norm, measured on GEMS' stash


def test_clipping_scales_the_stashed_task_gradients(tmp_path):
    trainer = make_trainer(tmp_path, steps=1, gems_kwargs={"stash": "full"})
    trainer.create_optimizer()
    batch = collate([TinyTasks()[i] for i in range(6)])
    trainer.training_step(trainer.model, batch)
    stash = trainer.gems_optimizer._task_grads
    before = {t: {k: g.clone() for k, g in stash.grads[t].items()} for t in TASKS}
    mixed = {k: g.clone() for k, g in stash.mixed.items()}  # one backward: the untargeted parameters' gradient
    norm = trainer.gems_optimizer.shared_grad_norm()
    assert norm > 0
    trainer.args.max_grad_norm = norm / 4
    reported = float(trainer._clip_grad_norm(trainer.model))
    assert reported == pytest.approx(norm)
    assert trainer.gems_optimizer.shared_grad_norm() == pytest.approx(norm / 4, rel=1e-4)
    for t in TASKS:  # every task gradient scaled by the same factor: task ratios (and gates' shares) kept
        assert len(stash.grads[t]) + len(mixed) == len(list(trainer.model.parameters()))
        for k, g in stash.grads[t].items():
            torch.testing.assert_close(g, before[t][k] * (norm / 4) / (norm + 1e-6))
    assert len(mixed) == 7  # embedding, LM head, 5 norms
    for k, g in stash.mixed.items():
        torch.testing.assert_close(g, mixed[k] * (norm / 4) / (norm + 1e-6))
    trainer.args.max_grad_norm = 10 * norm  # below the limit: untouched
    trainer._clip_grad_norm(trainer.model)
    assert trainer.gems_optimizer.shared_grad_norm() == pytest.approx(norm / 4, rel=1e-4)


def test_save_and_resume_is_bit_exact(tmp_path):
    full = make_trainer(tmp_path / "full", steps=7, save_steps=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full.train()
    part = make_trainer(tmp_path / "part", steps=7, save_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        part.train()
    ckpt = tmp_path / "part" / "checkpoint-4"
    assert (ckpt / "optimizer.pt").is_file()
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sd["format_version"] == 2 and any("gems" in e for e in sd["state"].values())  # GEMS' own, bases included
    resumed = make_trainer(tmp_path / "part", steps=7, save_steps=4, model=tiny_model(123))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.train(resume_from_checkpoint=str(ckpt))
    wf, wr = weights(full.model), weights(resumed.model)
    assert set(wf) == set(wr)
    for k in wf:
        assert torch.equal(wf[k], wr[k]), k
    w_init = weights(tiny_model(0))
    assert all(not torch.equal(wf[k], w_init[k]) for k in wf)  # seven steps moved every tensor


def test_needs_task_column(tmp_path):
    trainer = make_trainer(tmp_path, steps=1)
    trainer.create_optimizer()
    batch = collate([TinyTasks()[0], TinyTasks()[1]])
    batch.pop("task")
    with pytest.raises(KeyError, match="task"):
        trainer.training_step(trainer.model, batch)
    bad = collate([TinyTasks()[0]])
    bad["task"] = ["nope"]
    with pytest.raises(ValueError, match="unknown task"):
        trainer.training_step(trainer.model, bad)


def _targeted(trainer):
    opt = trainer.create_optimizer()
    return opt, sorted(w.name.removesuffix(".weight") for w in opt.subspaces)


def test_training_arguments_conventions(tmp_path, caplog):
    """optim_target_modules and optim_args as transformers' GaLore reads them: a list matches names equal to,
    containing or fully matching an entry, a string is a full-name regex, "all-linear" is gems' default; the
    GEMS options of optim_args are typed; other keys are left to transformers, with a log line."""
    args_kw = dict(optim_target_modules=["q_proj", r"model\.layers\.1\.mlp\.down_proj"],
                   optim_args="rank=4, task_rank=2,update_proj_gap=3,scale=0.5,warm_start=true,adaptive_refresh=None,"
                              "momentum=0.9")
    with caplog.at_level("WARNING", logger="gems.integrations.transformers"):
        opt, names = _targeted(make_trainer(tmp_path, args_kw=args_kw, base_gems_kwargs={}))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    cfg = opt.config
    assert (cfg.rank, cfg.task_rank, cfg.update_proj_gap, cfg.scale, cfg.warm_start, cfg.adaptive_refresh) == \
        (4, 2, 3, 0.5, True, None)
    assert "momentum" in caplog.text and "not GEMS options" in caplog.text
    _, names = _targeted(make_trainer(tmp_path, args_kw=dict(optim_target_modules=r".*\.mlp\..*_proj")))
    assert len(names) == 6 and all(".mlp." in n for n in names)
    _, default = _targeted(make_trainer(tmp_path))
    _, all_linear = _targeted(make_trainer(tmp_path, args_kw=dict(optim_target_modules="all-linear")))
    assert all_linear == default and len(default) == 14 and not any("lm_head" in n for n in default)


@pytest.mark.parametrize("args_kw, gems_kwargs, match", [
    (dict(optim_args="rank=four"), {}, "rank='four' is not a valid int"),
    (dict(optim_args="warm_start=maybe"), {}, "warm_start='maybe' is not a valid bool"),
    (dict(optim_args="rank"), {}, "'key=value' pairs"),
    (dict(optim_args="rank=8"), {}, "rank is 4 in gems_kwargs and 8 in optim_args"),
    (dict(optim_target_modules=["q_proj"]), dict(target_modules=["k_proj"]), "give it once"),
    # a string is a regex over the whole name: "q_proj" alone names no module (a list entry would)
    (dict(optim_target_modules="q_proj"), {}, "matches no nn.Linear"),
])
def test_training_arguments_conventions_errors(tmp_path, args_kw, gems_kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, args_kw=args_kw, gems_kwargs=gems_kwargs).create_optimizer()


class PaddedTasks(torch.utils.data.Dataset):
    """What a tokenised dataset usually holds: padded input_ids, attention_mask, labels and a task name."""

    def __init__(self):
        self.rows = collate([TinyTasks()[i] for i in range(len(TinyTasks()))])

    def __len__(self):
        return self.rows["input_ids"].shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.rows["input_ids"][i], "attention_mask": self.rows["attention_mask"][i],
                "labels": self.rows["labels"][i], "task": self.rows["task"][i]}


def test_task_column_without_a_custom_collator(tmp_path):
    """transformers' default collator drops string columns; the trainer keeps the task names anyway and
    trains exactly as with the custom collator that batches them itself."""
    args = make_trainer(tmp_path, steps=4).args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = GemsTrainer(model=tiny_model(0), args=args, train_dataset=PaddedTasks(), tasks=TASKS,
                            gems_kwargs=dict(rank=4, task_rank=2, update_proj_gap=5))
        plain.train()
        custom = GemsTrainer(model=tiny_model(0), args=args, train_dataset=PaddedTasks(), tasks=TASKS,
                             data_collator=lambda rows: {**transformers.default_data_collator(rows),
                                                         "task": [r["task"] for r in rows]},
                             gems_kwargs=dict(rank=4, task_rank=2, update_proj_gap=5))
        custom.train()
    wp, wc, w0 = weights(plain.model), weights(custom.model), weights(tiny_model(0))
    for k in wp:
        assert torch.equal(wp[k], wc[k]), k
    assert any(not torch.equal(wp[k], w0[k]) for k in wp)


def test_task_column_collator_cases():
    from gems.integrations.transformers import TaskColumnCollator
    rows = [{"x": torch.tensor([1, 2]), "task": "rec"}, {"x": torch.tensor([3, 4]), "task": "search"}]

    def strict(features):  # like a tokenizer's pad: every value must become a tensor
        return {k: torch.tensor([list(map(int, f[k])) if isinstance(f[k], Tensor) else f[k] for f in features])
                for k in features[0]}

    out = TaskColumnCollator(strict, "task")(rows)
    assert out["task"] == ["rec", "search"] and out["x"].tolist() == [[1, 2], [3, 4]]
    own = TaskColumnCollator(lambda f: {"task": "kept by the collator"}, "task")(rows)
    assert own == {"task": "kept by the collator"}
    assert TaskColumnCollator(lambda f: {"n": len(f)}, "task")([{"x": 1}]) == {"n": 1}  # no task column
