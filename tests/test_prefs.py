import json, subprocess, sys
from pathlib import Path
import pytest
import torch
from finetune_lab.core import FinetuneLabError
from finetune_lab.data import DataSettings, check_dataset, load_rows
from finetune_lab.models import load_tokenizer, prepare_model
from finetune_lab.prefs import DPOSettings, follow_splits, load_preferences, preference_accuracy, train_dpo
from finetune_lab.sft import SFTSettings, train_sft

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT/"tests"/"fixtures"
EXE = Path(sys.executable).parent/"finetune-lab"


@pytest.fixture(scope="module")
def pairs():
    rows = load_rows(ROOT/"data"/"tickets_prefs.jsonl")[:60]
    return {"train": rows[:40], "val": rows[40:48], "test": rows[48:60]}


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    rows = [r for r in load_rows(ROOT/"data"/"tickets_raw.jsonl")[:60] if "{" in r["messages"][-1]["content"]]
    return train_sft("tiny", {"train": rows[:32], "val": rows[32:36]}, SFTSettings(max_steps=2, eval_steps=1, eval_rows=4), out, live_plot=False).output


def test_bad_pairs_are_quarantined_with_reasons_not_crashed_on():
    check = check_dataset(FIX/"bad_prefs.jsonl", DataSettings(model_name="tiny"))
    counts = check.report.counts
    assert counts["identical_pair"] == 1 and counts["empty_output"] == 1 and counts["missing_prompt"] == 2
    assert len(check.kept) == 3 and len(check.quarantine) == 4
    assert sorted(q["line"] for q in check.quarantine) == [4, 5, 6, 7]


def test_pairs_follow_the_sft_split():
    sft = {"train": [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}], "meta": {"phrasing": "f1"}}],
           "test": [{"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "x"}], "meta": {"phrasing": "f2"}}]}
    pair = lambda text, fam: {"prompt": [{"role": "user", "content": text}], "chosen": [{"role": "assistant", "content": "y"}],
                              "rejected": [{"role": "assistant", "content": "z"}], "meta": {"phrasing": fam}}
    splits, moved = follow_splits({"train": [pair("b", "f9"), pair("c", "f2"), pair("d", "f7")], "test": [pair("a", "f1")]}, sft)
    assert moved == 3
    assert [p["prompt"][0]["content"] for p in splits["test"]] == ["b", "c"]   # by prompt, then by family
    assert [p["prompt"][0]["content"] for p in splits["train"]] == ["d", "a"]  # unknown family stays; "a" is an SFT training ticket


def test_preference_accuracy_is_complemented_by_swapping(pairs):
    from transformers import AutoModelForCausalLM
    m, tok = AutoModelForCausalLM.from_pretrained(prepare_model("tiny")), load_tokenizer("tiny", "train")
    a = preference_accuracy(m, tok, pairs["test"])
    b = preference_accuracy(m, tok, [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs["test"]])
    assert abs(a["accuracy"] + b["accuracy"] - 1) < 1e-9 and set(a["by_rejection"]) <= {"wrong_category", "invalid_json", "chatty_prose", "wrong_product"}


def test_dpo_from_an_sft_adapter_keeps_no_second_model_and_saves_a_peft_adapter(pairs, sft_adapter, tmp_path):
    from peft import AutoPeftModelForCausalLM
    res = train_dpo("tiny", pairs, DPOSettings(max_steps=2, batch_size=2, eval_steps=1, eval_rows=4), tmp_path/"dpo", adapter=sft_adapter, live_plot=False)
    assert res.steps == 2 and res.trainer.ref_model is None
    assert 0 < res.details["reference_params"] < res.total_params / 10            # a frozen adapter copy, not a second model
    assert any("eval_rewards/margins" in h for h in res.log_history)
    assert not (Path(res.output)/"ref").exists()
    m = AutoPeftModelForCausalLM.from_pretrained(res.output)
    assert sum(p.numel() for n, p in m.named_parameters() if "lora_" in n) > 0


def test_transcript_pairs_load_and_train_dpo(tmp_path):
    splits = load_preferences(FIX/"hh_transcripts.jsonl")
    rows = [r for v in splits.values() for r in v]
    assert rows and all(r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == "assistant" for r in rows)
    res = train_dpo("tiny", {"train": rows, "val": rows[:1]}, DPOSettings(max_steps=1, batch_size=2, eval_steps=1), tmp_path/"hh", live_plot=False)
    assert res.steps == 1 and res.details["reference_params"] == 0              # fresh adapter: the reference is the base, adapter disabled


def test_sft_rows_are_not_preference_data():
    with pytest.raises(FinetuneLabError, match="not preference data"): load_preferences(FIX/"chat.jsonl")


def test_cli_dpo_and_its_errors(sft_adapter, tmp_path):
    run = lambda *a: subprocess.run([str(EXE), "dpo", *map(str, a)], capture_output=True, text=True, timeout=600)
    r = run("--data", FIX/"hh_transcripts.jsonl", "--model", "tiny", "--max-steps", "1", "--batch-size", "2", "--out", tmp_path/"a", "--adapter", sft_adapter)
    assert r.returncode == 0, r.stderr
    assert (tmp_path/"a"/"adapter"/"adapter_config.json").is_file() and "reference: a frozen copy" in r.stdout
    bad = run("--data", FIX/"hh_transcripts.jsonl", "--model", "tiny", "--adapter", tmp_path, "--out", tmp_path/"b")
    assert bad.returncode == 2 and "not a PEFT adapter folder" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_mistake_pairs_from_a_models_wrong_answers():
    from finetune_lab.prefs import mistake_pairs
    gold = {"category": "billing", "priority": "low", "product": "PulseFit watch", "sentiment": "neutral", "summary": "Customer wants an invoice."}
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "invoice for my PulseFit watch?"},
                        {"role": "assistant", "content": json.dumps(gold)}], "meta": {"phrasing": "billing/x/1"}}
    answers = [json.dumps(gold),                                              # right: no pair
               json.dumps({**gold, "summary": "Other words, same facts."}),  # only the summary differs: no pair
               json.dumps({**gold, "category": "refund", "priority": "high", "summary": "x"}),
               "Sure! Billing.", "   "]
    got = mistake_pairs([row] * len(answers), answers)
    assert [p["meta"]["rejection"] for p in got] == ["own_category", "own_invalid_json"]
    rej = json.loads(got[0]["rejected"][0]["content"])
    assert rej == {**gold, "category": "refund", "priority": "high"}          # the model's wrong fields in the right answer, its summary not taken
    assert got[0]["chosen"][0]["content"] == json.dumps(gold) and got[0]["prompt"] == row["messages"][:-1]
    assert got[0]["meta"]["phrasing"] == "billing/x/1" and got[1]["rejected"][0]["content"] == "Sure! Billing."


def test_dpo_with_an_sft_loss_adds_it_to_the_loss(pairs, tmp_path):
    "sft_weight adds TRL's 'sft' loss (NLL of the chosen answer): the logged loss grows by it, the DPO margins are still logged."
    plain = train_dpo("tiny", pairs, DPOSettings(max_steps=1, batch_size=2, eval_steps=1, eval_rows=4, sft_weight=0.0), tmp_path/"plain", live_plot=False)
    rpo = train_dpo("tiny", pairs, DPOSettings(max_steps=1, batch_size=2, eval_steps=1, eval_rows=4, sft_weight=1.0), tmp_path/"rpo", live_plot=False)
    ev = lambda r: next(h for h in r.log_history if "eval_loss" in h)
    assert ev(rpo)["eval_loss"] > ev(plain)["eval_loss"] + 1.0        # a random tiny model's NLL is large: log(49k) per token ≈ 10.8
    assert "eval_rewards/margins" in ev(rpo)


def test_pair_summary_gives_n_an_interval_and_per_pair_wins():
    from finetune_lab.prefs import fmt_pairs, pair_summary
    pairs = [{"meta": {"rejection": k}} for k in ("a", "a", "b", "b")]
    s = pair_summary(pairs, [1.0, 1.0, 0.0, 2.0], [0.0, 2.0, 1.0, 1.0])
    assert s["per_pair"] == [1, 0, 0, 1] and s["accuracy"] == 0.5 and s["by_rejection_n"] == {"a": 2, "b": 2}
    assert s["accuracy_ci"][0] <= 0.5 <= s["accuracy_ci"][1] and s["accuracy_ci"][0] < s["accuracy_ci"][1]
    line = fmt_pairs(s)
    assert line.startswith("50.0% [") and "of 4 pairs" in line and "a 50% (2)" in line
    assert fmt_pairs({"n": 0, "accuracy": float("nan")}) == "no pairs"
