"""The unified search + recommendation recipe: metrics, item-token loss, ranking, errors, and a --quick run."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import require
from gems.recipes import evaluate as E
from gems.recipes import unified_sr as U


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one thread avoids OpenMP oversubscription on shared cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ metrics
def test_ranking_metrics_hand_computed():
    # ranks 0, 1, 4, 9, 30 (0-based)
    m = E.ranking_metrics([0, 1, 4, 9, 30])
    assert m["hr@5"] == pytest.approx(3 / 5)
    assert m["hr@10"] == pytest.approx(4 / 5)
    assert m["hr@20"] == pytest.approx(4 / 5)
    ndcg = [1.0, 1 / math.log2(3), 1 / math.log2(6), 1 / math.log2(11), 0.0]
    assert m["ndcg@5"] == pytest.approx(sum(ndcg[:3]) / 5)
    assert m["ndcg@10"] == pytest.approx(sum(ndcg[:4]) / 5)
    assert m["ndcg@20"] == pytest.approx(sum(ndcg) / 5)


def test_target_ranks_ties_count_against_target():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0], [3.0, 2.0, 1.0, 0.0]])
    ranks = E.target_ranks(scores, torch.tensor([2, 0, 0]))
    assert ranks.tolist() == [2, 3, 0]  # 0.9 and the tied 0.5 are ahead; a constant row ranks last


def test_evaluate_ranking_masks_seen_items_and_sampled_protocol():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    # target item 2: items 0 and 1 score higher; masking item 0 (seen) moves it to rank 1
    full = E.evaluate_ranking(scores, [2], ks=(1, 2))
    assert full["hr@1"] == 0.0 and full["hr@2"] == 0.0
    masked = E.evaluate_ranking(scores, [2], seen=[[0, 2]], ks=(1, 2))  # the target is never masked
    assert masked["hr@2"] == 1.0 and masked["ndcg@2"] == pytest.approx(1 / math.log2(3))
    sampled = E.evaluate_ranking(scores, [2], candidates=[[2, 3, 4]], ks=(1,))
    assert sampled["sampled/hr@5"] == 1.0 and sampled["sampled/ndcg@10"] == 1.0


def test_collate_left_pads_and_appends_targets():
    b = E.collate_left([[5, 6, 7], [8]], pad_id=0, targets=[100, 101])
    assert b["input_ids"].tolist() == [[5, 6, 7, 100], [0, 0, 8, 101]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]


# ------------------------------------------------------------------------------------------ tiny model
def tiny_lm(vocab=40, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_item_token_loss_is_cross_entropy_of_the_appended_token():
    model = tiny_lm()
    rows, targets = [[3, 4, 5, 6], [7, 8]], [30, 33]
    batch = E.collate_left(rows, 0, targets)
    loss = E.item_token_loss(model, batch)
    for i, (r, t) in enumerate(zip(rows, targets)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r])).logits[0, -1]
        ref = torch.nn.functional.cross_entropy(logits[None], torch.tensor([t]))
        assert float(loss[i]) == pytest.approx(float(ref), rel=1e-4, abs=1e-5)
    items = torch.arange(30, 40)
    loss_items = E.item_token_loss(model, batch, item_ids=items)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([rows[0]])).logits[0, -1, 30:40]
    ref = torch.nn.functional.cross_entropy(logits[None], torch.tensor([0]))
    assert float(loss_items[0]) == pytest.approx(float(ref), rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="not an item token"):
        E.item_token_loss(model, E.collate_left(rows, 0, [3, 30]), item_ids=items)


def test_score_items_matches_unbatched_forward():
    model = tiny_lm()
    rows = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    items = torch.arange(30, 40)
    scores = E.score_items(model, rows, items, pad_id=0, batch_size=2)
    assert scores.shape == (3, 10)
    for i, r in enumerate(rows):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([r])).logits[0, -1, 30:40]
        torch.testing.assert_close(scores[i], ref, rtol=1e-4, atol=1e-5)


def test_perplexity_and_state_bytes():
    model = tiny_lm()
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    ppl = E.perplexity(model, [batch])
    assert math.isfinite(ppl) and ppl > 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**{k: v for k, v in batch.items() if k != "labels"}).logits.sum().backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    assert E.state_bytes(opt.state) == pytest.approx(2 * 4 * n, abs=4 * 200)  # two fp32 moments (+ steps)


# ------------------------------------------------------------------------------------------ CLI errors
def run_main(argv, capsys):
    rc = U.main(argv)
    err = capsys.readouterr().err
    return rc, err


def test_missing_data_file_is_one_line_error(tmp_path, capsys):
    rc, err = run_main(["--interactions", str(tmp_path / "nope.csv"), "--items", str(tmp_path / "items.csv"),
                        "--out", str(tmp_path), "--no-progress"], capsys)
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "not found" in lines[0]
    assert "Traceback" not in err


def test_items_file_missing_column_is_one_line_error(tmp_path, capsys):
    (tmp_path / "inter.csv").write_text("user,item,timestamp\n1,a,1\n1,b,2\n1,c,3\n")
    (tmp_path / "items.csv").write_text("item,title,year\na,A,1990\nb,B,1991\nc,C,1992\n")
    rc, err = run_main(["--interactions", str(tmp_path / "inter.csv"), "--items", str(tmp_path / "items.csv"),
                        "--out", str(tmp_path), "--no-progress"], capsys)
    assert rc == 2 and "error:" in err and "genres" in err and "Traceback" not in err


def test_unknown_model_path_is_one_line_error(tmp_path, capsys):
    rc, err = run_main(["--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path), "--no-progress"], capsys)
    assert rc == 2 and "error:" in err and "not found" in err and "Traceback" not in err


def test_empty_split_is_one_line_error(tmp_path, capsys):
    # every user has < 3 interactions: nothing to validate or test
    (tmp_path / "inter.csv").write_text("user,item,timestamp\n1,a,1\n1,b,2\n2,a,1\n")
    (tmp_path / "items.csv").write_text("item,title,genres,year\na,A,Drama,1990\nb,B,Comedy,1991\n")
    rc, err = run_main(["--interactions", str(tmp_path / "inter.csv"), "--items", str(tmp_path / "items.csv"),
                        "--out", str(tmp_path), "--no-progress"], capsys)
    assert rc == 2 and "error:" in err and "Traceback" not in err


def test_cli_presets_and_overrides():
    cfg = U.parse_args(["--preset", "smoke", "--methods", "gems,lora", "--steps", "3", "--out", "x"])
    assert cfg.methods == ("gems", "lora") and cfg.steps == 3 and cfg.tag == "unified_sr_cpu_smoke"
    assert cfg.rec_batch == U.PRESETS["smoke"]["rec_batch"]
    full = U.parse_args(["--preset", "full"])
    assert full.methods == tuple(U.METHODS) and full.seeds == (0, 1, 2) and full.eval_users is None
    assert all(len(U.grid_of(full, m)) >= 3 for m in full.methods)
    d = U.parse_args([])
    assert d.tag == "unified_sr_cpu" and U.grid_of(d, "gems") == (U.LR_CHOSEN["gems"],)
    assert U.parse_args(["--lr-grid", "1e-4,3e-4", "--eval-users", "0"]).eval_users is None
    assert U.parse_args(["--lr-grid", "1e-4,1e-4,3e-4"]).lr_grid == (1e-4, 3e-4)
    for bad in (["--methods", "sgd"], ["--interactions", "a.csv"], ["--lr-grid", "0"], ["--steps", "0"],
                ["--refresh", "qr"], ["--ns-mode", "x"], ["--num-negatives", "0"], ["--warmup", "1.5"],
                ["--head-lr", "0"], ["--item-scores", "x"], ["--item-init", "random"], ["--collab-dim", "0"],
                ["--collab-weight", "-1"], ["--collab-avoid", "1"], ["--rec-head-lr", "0"], ["--head-stats", "0"]):
        with pytest.raises(SystemExit):
            U.parse_args(bad)


def test_optimizer_state_mib_counts_gems_bases():
    import warnings

    import gems

    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = gems.GemsOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, tasks=["search", "rec"],
                                 rank=2, task_rank=1)
    losses = {"search": model(torch.randn(3, 8)).pow(2).mean(), "rec": model(torch.randn(3, 8)).sum()}
    opt.backward(losses)
    opt.step()
    bases = sum(b.numel() * 4 for w in opt.subspaces for b in w.bases.values() if b is not None)
    assert bases > 0
    assert U.optimizer_state_mib(opt) * 2**20 == E.state_bytes(opt.inner.state) + bases  # each byte once


# ------------------------------------------------------------------------------------------ end to end
# Four users, six items: the baselines' test metrics below are computed by hand in the comments.
#   u1: 1 2 3 | valid 4 | test 5      u2: 1 2 3 | 5 | 6      u3: 3 4 5 | 6 | 1      u4: 2 4 6 | 1 | 3
# Training counts: 1:2, 2:3, 3:3, 4:2, 5:1, 6:1.  Test masks train + valid, so two items remain per user:
#   popularity  u1 {5:1, 6:1} tie -> rank 1;  u2 {4:2, 6:1} -> 1;  u3 {1:2, 2:3} -> 1;  u4 {3:3, 5:1} -> 0
#   transitions (C[1,2]=2, C[2,3]=2, C[3,4]=1, C[4,5]=1, C[2,4]=1, C[4,6]=1, last 3 history items, ties by pop/4)
#     u1 [2,3,4]: 5 -> 1.25, 6 -> 1.25 tie -> 1;  u2 [2,3,5]: 4 -> 2.5, 6 -> 0.25 -> 1;
#     u3 [4,5,6]: 1 -> 0.5, 2 -> 0.75 -> 1;       u4 [4,6,1]: 3 -> 0.75, 5 -> 1.25 -> 1
SEQS = {"u1": [1, 2, 3, 4, 5], "u2": [1, 2, 3, 5, 6], "u3": [3, 4, 5, 6, 1], "u4": [2, 4, 6, 1, 3]}
POP_NDCG = (3 / math.log2(3) + 1) / 4
TRANS_NDCG = 1 / math.log2(3)


def _synthetic(tmp_path):
    inter = ["user,item,timestamp"] + [f"{u},{i},{t}" for u, seq in SEQS.items() for t, i in enumerate(seq)]
    (tmp_path / "inter.csv").write_text("\n".join(inter) + "\n")
    items = ["item,title,genres,year", "1,Alpha Heist,Crime,1991", "2,Bravo Dream,Comedy|Drama,1992",
             "3,Charlie Storm,Action,1993", "4,Delta Night,Horror,1994", "5,Echo River,Drama,1995",
             "6,Foxtrot Moon,Romance|Comedy,1996"]
    (tmp_path / "items.csv").write_text("\n".join(items) + "\n")


def _tiny_model(path):
    """A 2-layer Llama with the real tokenizer: the pipeline end to end in seconds."""
    transformers = pytest.importorskip("transformers")
    from gems.recipes.model import load_tokenizer

    tok = load_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    require("peft")
    require("galore_torch")
    tmp = tmp_path_factory.mktemp("e2e")
    _synthetic(tmp)
    _tiny_model(tmp / "model")
    argv = ["--interactions", str(tmp / "inter.csv"), "--items", str(tmp / "items.csv"), "--model", str(tmp / "model"),
            "--methods", "adamw,adamw_rec,galore_ns,gems", "--lr-grid", "1e-4,0.3", "--seeds", "0,1",
            "--steps", "2", "--rec-batch", "2", "--search-batch", "2", "--window", "4", "--val-users", "4",
            "--eval-users", "0", "--val-points", "2", "--num-negatives", "1", "--rank", "4", "--task-rank", "2",
            "--gap", "1", "--calib-texts", "2", "--ppl-texts", "2", "--cloze-items", "4", "--text-length", "16",
            "--out", str(tmp / "out"), "--no-progress"]
    cfg = U.parse_args(argv)
    events = []
    train, ranks = U.train_run, U.Evaluator.ranks

    def train_spy(method, lr, seed, *a, **k):
        events.append(("train", method, lr, seed))
        return train(method, lr, seed, *a, **k)

    def ranks_spy(self, model, sets, desc, head=None):
        events.append(("test" if sets is self.prep.test else "val", desc))
        return ranks(self, model, sets, desc, head)

    U.train_run, U.Evaluator.ranks = train_spy, ranks_spy
    try:
        report = U.run(cfg)
    finally:
        U.train_run, U.Evaluator.ranks = train, ranks
    return cfg, report, events


def test_synthetic_baselines_match_hand_computed_metrics(synthetic_run):
    _, report, _ = synthetic_run
    rows = {r["method"]: r for r in report["summary"]["rows"]}
    for task in ("rec", "search"):   # the search test items are the same targets with the same masks
        assert rows["popularity"][f"{task}/ndcg@10"][0] == pytest.approx(POP_NDCG, abs=1e-12)
        assert rows["transition"][f"{task}/ndcg@10"][0] == pytest.approx(TRANS_NDCG, abs=1e-12)
    assert report["baselines"]["popularity"]["rec"]["full"] == [1, 1, 1, 0]
    assert report["baselines"]["transition"]["rec"]["full"] == [1, 1, 1, 1]


def test_synthetic_protocol_tunes_on_validation_and_reads_test_per_final(synthetic_run):
    cfg, report, events = synthetic_run
    # the test split is read by the base model and then only by final runs: for each method, after its
    # whole lr grid and once per seed
    assert events[:2] == [("val", "base valid"), ("test", "base test")]
    for m in cfg.methods:
        trains = [i for i, e in enumerate(events) if e[0] == "train" and e[1] == m]
        tests = [i for i, e in enumerate(events) if e == ("test", f"{m} test")]
        assert len(tests) == len(cfg.seeds)
        grid_end = trains[len(U.grid_of(cfg, m)) - 1]
        assert tests[0] > grid_end and [events[i][3] for i in trains[len(U.grid_of(cfg, m)):]] == [1]
    assert all(e[0] != "test" or e[1].endswith("test") for e in events)
    # the grid points differ on validation, so choosing the wrong one would show
    assert any(len({r["select"] for r in report["grid"][m]}) > 1 for m in cfg.methods)
    for m in cfg.methods:
        grid = report["grid"][m]
        assert [r["lr"] for r in grid] == [1e-4, 0.3]
        assert all("test_ranks" not in r for r in grid)               # the grid never reads the test split
        best = max(grid, key=lambda r: r["select"])
        assert report["chosen_lr"][m] == best["lr"]
        finals = report["finals"][m]
        assert [r["seed"] for r in finals] == [0, 1] and all(r["lr"] == best["lr"] for r in finals)
        assert all(len(r["test_ranks"]["rec"]["full"]) == 4 for r in finals)
        assert all(len(r["losses"]) == 2 and len(r["curve"]) == 2 for r in finals)
        tasks = U.METHODS[m].tasks
        assert all(set(r["losses"][0]) == set(tasks) for r in finals)
        assert finals[0]["select"] == pytest.approx(
            sum(finals[0]["val"][f"{t}/ndcg@10"] for t in tasks) / len(tasks))
    # single-task AdamW sees about the tokens of a mixed batch, from its own task only
    ratio = report["finals"]["adamw_rec"][0]["tokens"] / report["finals"]["adamw"][0]["tokens"]
    assert 0.75 < ratio < 1.25, ratio
    assert report["finals"]["gems"][0]["tokens"] == report["finals"]["adamw"][0]["tokens"]
    cis = report["summary"]["ci"]
    assert {c["vs"] for c in cis} >= {"adamw", "galore_ns", "popularity", "transition", "base"}
    for c in cis:
        assert c["lo"] <= c["diff"] <= c["hi"]
    out = os.path.join(cfg.out, cfg.tag)
    for ext in (".md", ".csv", ".json", "_runs.jsonl", "_pareto.png", "_val_ndcg.png", "_gems_conflict.png"):
        assert os.path.isfile(out + ext), ext
    md = open(out + ".md").read()
    assert "## Verdict" in md and "| popularity |" in md and "paired bootstrap" in md


def test_synthetic_rerun_resumes_without_training(synthetic_run, monkeypatch):
    cfg, report, _ = synthetic_run

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(U, "train_run", no_training)
    again = U.run(cfg)
    assert again["chosen_lr"] == report["chosen_lr"]
    assert again["summary"]["table_md"] == report["summary"]["table_md"]


@pytest.mark.slow
def test_smoke_preset_on_the_real_model(tmp_path):
    """``--preset smoke`` on SmolLM2 and MovieLens-100K: table, finite metrics, the methods moved."""
    require("peft")
    require("galore_torch")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "python"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "gems.recipes.unified_sr", "--preset", "smoke", "--out", str(tmp_path),
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "unified_sr_cpu_smoke.json").read_text())
    base = report["base"]["test_ranks"]
    for m, recs in report["finals"].items():
        assert recs and all(math.isfinite(r["retention"]["ppl"]) for r in recs), m
        assert any(r["test_ranks"] != base for r in recs), m
    assert "| gems |" in proc.stdout


def test_diverged_scores_rank_last_never_first():
    scores = torch.tensor([[0.5, float("nan"), 0.1], [float("nan"), 0.2, 0.3]])
    full, _ = E.example_ranks(scores, [0, 0])
    assert full.tolist() == [0, 2]   # a NaN competitor does not beat the target; a NaN target is last


def test_run_log_resumes_only_same_config_and_survives_a_cut_line(tmp_path):
    cfg = U.parse_args(["--preset", "smoke", "--out", str(tmp_path)])
    path = str(tmp_path / "runs.jsonl")
    log = U.RunLog(path, cfg, fresh=False, fingerprint="a")
    log.put("grid", {"method": "gems", "lr": 1e-3, "seed": 0, "val": {}})
    with open(path, "a") as f:
        f.write('{"kind": "grid", "method": "gems", "lr": 0.1')      # killed mid-line
    again = U.RunLog(path, cfg, fresh=False, fingerprint="a")
    assert again.get("grid", "gems", 1e-3, 0) is not None and again.get("grid", "gems", 0.1, 0) is None
    again.put("final", {"method": "gems", "lr": 1e-3, "seed": 0})
    third = U.RunLog(path, cfg, fresh=False, fingerprint="a")
    assert third.get("final", "gems", 1e-3, 0) is not None           # the record after the cut is intact
    assert U.RunLog(path, cfg, fresh=False, fingerprint="b").get("grid", "gems", 1e-3, 0) is None
    other = U.parse_args(["--preset", "smoke", "--out", str(tmp_path), "--steps", "5"])
    assert U.RunLog(path, other, fresh=False, fingerprint="a").get("grid", "gems", 1e-3, 0) is None
    assert U.RunLog(path, cfg, fresh=True, fingerprint="a").get("grid", "gems", 1e-3, 0) is None


@pytest.mark.parametrize("item_init", ["collab", "title"])
def test_item_start_and_heads_are_wired_from_the_training_split(tmp_path, item_init):
    """Item tokens = title means (+ the injected left factors), the search head starts at the title means, the
    rec head scores against the right factors with the start's hidden statistics and trains at its own lr."""
    from gems.recipes import data as D
    from gems.recipes.collab import energy_directions, inject_factors, transition_factors
    from gems.recipes.methods import Hyper, build_method

    _synthetic(tmp_path)
    _tiny_model(tmp_path / "model")
    cfg = U.parse_args(["--interactions", str(tmp_path / "inter.csv"), "--items", str(tmp_path / "items.csv"),
                        "--model", str(tmp_path / "model"), "--window", "4", "--val-users", "4", "--eval-users", "0", "--num-negatives", "1",
                        "--head-init", "0.5", "--collab-weight", "0.7", "--rec-head-lr", "2e-3", "--head-lr", "4e-5",
                        "--item-init", item_init])
    data = D.load_interactions(cfg.interactions, cfg.items)
    model, tok, ids = U.load_fresh(cfg, data.titles())
    titles = model.get_input_embeddings().weight[ids].detach().clone()
    prep = U.prepare(cfg, tok, ids, data)
    U.init_items(model, prep, cfg)
    rows = model.get_input_embeddings().weight[ids].detach()
    torch.testing.assert_close(prep.title_rows, titles, rtol=0, atol=0)
    if item_init == "title":
        assert prep.factors is None
        torch.testing.assert_close(rows, titles, rtol=0, atol=0)
    else:
        # factors come from the training split only (the leave-one-out targets never enter a count)
        idx = {it: k for k, it in enumerate(data.items)}
        want = transition_factors({u: [idx[i] for i in s] for u, s in prep.loo.train.items()}, len(data.items), 6)
        for got, w in zip(prep.factors, want):
            torch.testing.assert_close(got, w)
        torch.testing.assert_close(rows, inject_factors(titles, want[0], 0.7, seed=cfg.data_seed, avoid=prep.avoid))
        assert not torch.allclose(rows, titles)
        # the injected part stays out of the directions holding 99 % of the general text's final hidden
        # energy (at most hidden - dim of them), so the tied LM head's logits on that text barely move
        texts = U._general_texts("calibration", cfg)[:cfg.calib_texts]
        h = U._final_hidden(model, U._general_batches(tok, texts, cfg, False), cfg)
        k = min(energy_directions(h, 0.99).shape[1], 16 - 6)
        assert prep.avoid.shape == (16, k) and k >= 1
        part = rows - titles
        torch.testing.assert_close(prep.avoid.T @ part.T, torch.zeros(k, 6), atol=1e-5, rtol=0)
        plain = inject_factors(titles, want[0], 0.7, seed=cfg.data_seed) - titles
        assert (h @ part.T).norm() < (h @ plain.T).norm()
    # a second fresh model gets the same start (every method starts from it)
    again, _, _ = U.load_fresh(cfg, data.titles())
    U.init_items(again, prep, cfg)
    torch.testing.assert_close(again.get_input_embeddings().weight[ids], rows, rtol=0, atol=0)

    mean, std = prep.hidden_stats
    assert mean.shape == std.shape == (16,) and bool((std > 0).all())
    head = U.new_head(cfg, prep, model)
    torch.testing.assert_close(head["search"].weight.detach(), 0.5 * titles)
    vectors = titles if item_init == "title" else prep.factors[1]
    torch.testing.assert_close(head["rec"].items, vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-6))
    torch.testing.assert_close(head["rec"].center, mean, rtol=0, atol=0)
    torch.testing.assert_close(head["rec"].scale, std, rtol=0, atol=0)
    hp = Hyper(**{f: getattr(cfg, f) for f in ("item_lr", "head_lr", "weight_decay", "rank", "task_rank")})
    _, opt, info = build_method("adamw", model, ids, 1e-4, hp, extra=U.head_groups(head, cfg))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(head["rec"].map)] == 2e-3 and lr_of[id(head["search"].weight)] == 4e-5
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if any(p is head["rec"].map for p in g["params"]))
    assert info["trainable_params"] >= sum(p.numel() for p in head.parameters())


def test_hidden_stats_are_the_start_models_per_dimension_moments(tmp_path):
    from gems.recipes import data as D

    _synthetic(tmp_path)
    _tiny_model(tmp_path / "model")
    cfg = U.parse_args(["--interactions", str(tmp_path / "inter.csv"), "--items", str(tmp_path / "items.csv"),
                        "--model", str(tmp_path / "model"), "--window", "4", "--val-users", "4", "--eval-users", "0", "--num-negatives", "1",
                        "--head-stats", "1000"])
    data = D.load_interactions(cfg.interactions, cfg.items)
    model, tok, ids = U.load_fresh(cfg, data.titles())
    prep = U.prepare(cfg, tok, ids, data)
    # rows of different lengths, so a batch is padded (padding must not enter the moments)
    prep.rec_rows = [dataclasses.replace(r, ids=r.ids[:len(r.ids) - k % 3], targets=1) for k, r in enumerate(prep.rec_rows)]
    assert len({len(r.ids) for r in prep.rec_rows}) > 1
    U.init_items(model, prep, cfg)
    # every training window (head_stats exceeds their number), every real position, unpadded one by one
    with torch.no_grad():
        hs = torch.cat([model.get_decoder()(input_ids=torch.tensor([r.ids])).last_hidden_state[0]
                        for r in prep.rec_rows])
    mean, std = prep.hidden_stats
    torch.testing.assert_close(mean, hs.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(std, hs.std(0), atol=1e-4, rtol=1e-4)
