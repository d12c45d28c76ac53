"""The unified search + recommendation recipe: metrics, item-token loss, ranking, errors, and a --quick run."""
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


def test_cli_flags_and_quick_defaults():
    cfg = U.parse_args(["--quick", "--methods", "gems,lora", "--steps", "3", "--out", "x"])
    assert cfg.methods == ("gems", "lora") and cfg.steps == 3 and cfg.quick and cfg.tag == "unified_sr_cpu_quick"
    assert cfg.max_users == U.QUICK["max_users"]
    with pytest.raises(SystemExit):
        U.parse_args(["--methods", "sgd"])
    with pytest.raises(SystemExit):
        U.parse_args(["--interactions", "a.csv"])


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
    assert U.optimizer_state_mib(opt) * 2**20 >= E.state_bytes(opt.state) + bases


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """``--quick`` on the real model and MovieLens-100K: table, finite metrics, every method moved."""
    require("peft")
    require("galore_torch")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "python"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "gems.recipes.unified_sr", "--quick", "--out", str(tmp_path),
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = tmp_path / "unified_sr_cpu_quick"
    for ext in (".csv", ".json", ".md", "_val_ndcg.png", "_gems_conflict.png"):
        assert (tmp_path / (stem.name + ext)).is_file(), ext
    report = json.loads((tmp_path / (stem.name + ".json")).read_text())
    res = report["results"]
    assert set(res) == {"base", *U.METHODS}
    base = res["base"]["test"]
    assert len(U.METHODS) >= 4 and "base" not in U.METHODS
    for name in U.METHODS:
        r = res[name]
        assert all(math.isfinite(v) for v in r["test"].values()), name
        assert math.isfinite(r["ppl_after"]) and r["state_mib"] > 0, name
        # training moved the model: some test metric or the retention perplexity changed
        moved = any(r["test"][k] != base[k] for k in base) or r["ppl_after"] != report["ppl_before"]
        assert moved, name
        assert len(r["losses"]) == report["config"]["steps"]
    assert res["gems"]["diagnostics"] and any(k.endswith("/cos/search-rec") for k in res["gems"]["diagnostics"][0]["diag"])
    assert "| gems |" in proc.stdout
