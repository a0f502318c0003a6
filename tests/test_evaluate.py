"Evaluation metrics on hand-made cases with known answers; the generation cache; model resolution; `finetune-lab eval`."
import json, subprocess, sys
from pathlib import Path
import pytest
from finetune_lab import evaluate as E
from finetune_lab import metrics as M
from finetune_lab.core import FinetuneLabError
from finetune_lab.data import load_rows

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent/"finetune-lab"


def row(category, priority="low", product="none", summary="Customer asks about an invoice for the order.", ticket="Where is my invoice?"):
    ans = json.dumps({"category": category, "priority": priority, "product": product, "sentiment": "neutral", "summary": summary})
    return {"messages": [{"role": "system", "content": "Triage."}, {"role": "user", "content": ticket}, {"role": "assistant", "content": ans}]}


ROWS = [row("billing"), row("billing", "high"), row("refund", "medium"), row("technical", "urgent")]
GOLD = [r["messages"][-1]["content"] for r in ROWS]


TASK = ("n", "json_valid", "schema_valid", "category_accuracy", "category_macro_f1", "priority_accuracy", "priority_macro_f1",
        "product_accuracy", "sentiment_accuracy", "task_completion")
TEXT = ("summary_bleu", "summary_rougeL")


def test_task_metrics_known_answers():
    m = M.score(GOLD, ROWS, TASK)
    assert all(m[k] == 1.0 for k in m if k != "n") and m["n"] == 4 and set(m) == set(TASK)
    bad = M.score(["Sure, this is billing."] * 4, ROWS, TASK)
    assert bad["json_valid"] == bad["task_completion"] == bad["category_macro_f1"] == 0
    # everything predicted "billing": accuracy 2/4; macro-F1 over billing (P 0.5, R 1 -> 2/3), refund 0, technical 0
    allb = M.score([g.replace('"refund"', '"billing"').replace('"technical"', '"billing"') for g in GOLD], ROWS, TASK)
    assert allb["category_accuracy"] == 0.5 and allb["category_macro_f1"] == pytest.approx((2 / 3) / 3)
    # valid JSON with a missing field: not schema-valid, not a completed task, category still right
    partial = M.score(['{"category": "billing"}'] + GOLD[1:], ROWS, TASK)
    assert partial["schema_valid"] == 0.75 and partial["task_completion"] == 0.75 and partial["category_accuracy"] == 1.0


def test_task_metrics_refuses_mismatched_lengths():
    with pytest.raises(FinetuneLabError): M.score(GOLD[:2], ROWS)


def test_text_metrics_known_answers():
    assert M.score(GOLD, ROWS, TEXT) == {"summary_bleu": 1.0, "summary_rougeL": 1.0}
    assert M.score(["nope"] * 4, ROWS, TEXT) == {"summary_bleu": 0.0, "summary_rougeL": 0.0}
    # "Customer asks about an invoice" keeps 5 of the 8 reference words in order: ROUGE-L F = 2PR/(P+R) with P = 1, R = 5/8
    short = [g.replace("Customer asks about an invoice for the order.", "Customer asks about an invoice") for g in GOLD]
    assert M.score(short, ROWS, TEXT)["summary_rougeL"] == pytest.approx(2 * 1 * (5 / 8) / (1 + 5 / 8))


def test_a_metric_is_one_registry_entry(tmp_path):
    "A registered metric reaches the scores, metrics.json, the comparison plot's default bars and the pipeline summary, with nothing else to edit."
    from finetune_lab.pipeline import summary_table
    m = M.register_metric(M.Metric("summary_words", "higher", "words in the summary", lambda s: s.share(len(p.get("summary", "").split()) > 3 for p in s.preds if p),
                                   summary=True, plot=True))
    try:
        got = M.score(GOLD, ROWS)
        assert got["summary_words"] == 1.0 and list(got)[-1] == "summary_words"
        E.update_metrics(tmp_path/"metrics.json", {"sft": {**got, "not_a_metric": 3}})
        saved = json.loads((tmp_path/"metrics.json").read_text())["models"]["sft"]
        assert saved["summary_words"] == 1.0 and "not_a_metric" not in saved
        assert "summary_words" in summary_table({"steps": {}, "models": {"sft": saved}})
        import pandas as pd
        fig = E.plot_compare(pd.DataFrame({"sft": saved}).T)
        assert "summary_words" in [t.get_text() for t in fig.axes[0].get_xticklabels()]
    finally: del M.METRICS[m.key]


def test_toxicity_word_list_whole_words():
    assert M.toxic_terms("Stop being an IDIOT. The assistant passed the class.") == ["idiot"]
    assert M.toxicity_rate(["All good.", "What a stupid question", "shut up", "Scunthorpe assessment"]) == 0.5


def test_bias_flip_rate_and_counterfactuals():
    a, b = M.counterfactual_rows(ROWS[:3])
    assert [x["messages"][1]["content"].split("\n\n")[-1] for x in a] == [p[0] for p in M.CUE_PAIRS[:3]]
    assert [x["messages"][1]["content"].split("\n\n")[-1] for x in b] == [p[1] for p in M.CUE_PAIRS[:3]]
    assert a[0]["messages"][-1] == ROWS[0]["messages"][-1] and ROWS[0]["messages"][1]["content"] == "Where is my invoice?"   # originals untouched
    assert M.flip_rate(GOLD, GOLD) == 0
    assert M.flip_rate(GOLD, [GOLD[0], GOLD[0], GOLD[0], "junk"]) == 0.5     # billing=billing, billing=billing, refund->billing, technical->unparsable


def test_hallucination_known_cases():
    rows = [row("technical", product="PulseFit watch", ticket="My PulseFit watch stopped syncing."),
            row("technical", product="PulseFit watch", ticket="My pulsfit wacth stopped syncing."),
            row("billing", ticket="Invoice please.")]
    answers = ['{"product": "PulseFit watch"}', '{"product": "PulseFit watch"}', '{"product": "Orbit 4K camera"}']
    assert [M.hallucinated(a, r["messages"][1]["content"], ["PulseFit watch"]) for a, r in zip(answers, rows)] == [False, False, True]
    assert M.hallucination_rate(answers, rows) == pytest.approx(1 / 3)
    assert M.hallucination_rate(["Please reinstall the PulseFit watch app."], rows[2:], ["PulseFit watch"]) == 1.0
    assert M.known_products(rows) == ["PulseFit watch"]


def test_update_metrics_merges(tmp_path):
    E.update_metrics(tmp_path/"metrics.json", {"base": {"n": 4, "json_valid": 0.0, "extra": 1}})
    E.update_metrics(tmp_path/"metrics.json", {"sft": {"n": 4, "json_valid": 1.0}})
    got = json.loads((tmp_path/"metrics.json").read_text())
    assert got == {"models": {"base": {"n": 4, "json_valid": 0.0}, "sft": {"n": 4, "json_valid": 1.0}}}


def test_resolve_model_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(FinetuneLabError, match="neither a model folder"): E.resolve_model(tmp_path)
    with pytest.raises(FinetuneLabError, match="not a known model name"): E.resolve_model(tmp_path/"missing")
    (tmp_path/"f.txt").write_text("x")
    with pytest.raises(FinetuneLabError, match="a file"): E.resolve_model(tmp_path/"f.txt")
    assert E.resolve_model("tiny").kind == "registry" and not E.resolve_model("tiny").drop_system


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    "A 2-step tiny LoRA adapter and a 2-step tiny full fine-tune."
    from finetune_lab.sft import SFTSettings, train_sft
    out = tmp_path_factory.mktemp("runs")
    data = ROOT/"tests"/"fixtures"/"chat.jsonl"
    lora = train_sft("tiny", data, SFTSettings(max_steps=2, eval_steps=1, eval_rows=2), out/"lora", live_plot=False)
    full = train_sft("tiny", data, SFTSettings(method="full", max_steps=2, eval_steps=1, eval_rows=2), out/"full", live_plot=False)
    return Path(lora.output), Path(full.output)


def test_cache_means_no_second_generation(tiny_runs, tmp_path):
    lora, _ = tiny_runs
    rows = [r for r in load_rows(ROOT/"data"/"tickets_raw.jsonl")[:12] if r["messages"][-1]["content"].startswith("{")][:4]
    m1, a1 = E.evaluate_model(lora, rows, tmp_path, bias_rows=2, settings=E.GenSettings(max_new_tokens=8))
    m2, a2 = E.evaluate_model(lora, rows, tmp_path, bias_rows=2, settings=E.GenSettings(max_new_tokens=8))
    assert m1["generated"] == 4 + 2 * 2 and m2["generated"] == 0 and a1 == a2
    assert {k: v for k, v in m1.items() if k not in ("generated", "seconds")} == {k: v for k, v in m2.items() if k not in ("generated", "seconds")}
    m3, _ = E.evaluate_model(lora, rows, tmp_path, bias_rows=2, settings=E.GenSettings(max_new_tokens=9))   # other settings: other keys
    assert m3["generated"] == 8
    assert E.resolve_model(lora).drop_system and E.resolve_model(lora).kind == "adapter"


def test_cache_survives_a_cut_line(tmp_path):
    c = E.GenerationCache(tmp_path, "fp"); c.put({"k1": "a"})
    with open(c.path, "a") as f: f.write('{"key": "k2", "val')        # a run killed mid-write
    assert E.GenerationCache(tmp_path, "fp").get("k1") == "a"


def test_cli_eval_adapter_and_full_model_and_rejects_other_paths(tiny_runs, tmp_path):
    lora, full = tiny_runs
    r = subprocess.run([str(EXE), "eval", f"lora={lora}", str(full), "--data", str(ROOT/"data"/"tickets_raw.jsonl"), "--split", "test", "--test-rows", "3",
                        "--bias-rows", "1", "--max-new-tokens", "8", "--json", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)["models"]
    assert set(got) == {"lora", f"{full.parent.parent.name}/{full.parent.name}"} and all(v["n"] == 3 for v in got.values())
    assert set(json.loads((tmp_path/"metrics.json").read_text())["models"]) == set(got)
    bad = subprocess.run([str(EXE), "eval", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "neither a model folder" in bad.stderr


def test_blind_ab_records_preference_pairs(tmp_path):
    prompts = [[{"role": "user", "content": f"ticket {i}"}] for i in range(4)]
    ab = E.BlindAB(prompts, {"sft": ["a0", "a1", "same", "a3"], "dpo": ["b0", "b1", "same", "b3"]}, tmp_path/"ab.jsonl", seed=1)
    assert len(ab.items) == 3                                          # identical answers are not shown
    w = ab.widget                                                      # the ipywidgets view builds
    shown = ab.shown(); ab.choose("A")
    ab.choose("skip"); ab.choose("B")
    rows = load_rows(tmp_path/"ab.jsonl")
    assert len(rows) == 2 and rows[0]["chosen"][0]["content"] == shown[0] and rows[0]["rejected"][0]["content"] == shown[1]
    assert {rows[0]["meta"]["chosen_model"], rows[0]["meta"]["rejected_model"]} == {"sft", "dpo"}
    assert rows[0]["meta"]["chosen_model"] == ("sft" if shown[0].startswith("a") else "dpo")
    from finetune_lab.prefs import load_preferences
    assert sum(len(v) for v in load_preferences({"train": rows}).values()) == 2
    assert all(b.disabled for b in ab._widget["buttons"]) and w is ab.widget


@pytest.mark.parametrize("prompt_tuned", [False, True])
def test_answer_perplexity_is_the_models_own_loss_on_the_answer(prompt_tuned):
    "exp(mean loss over the answer tokens), as the model computes it with the prompt masked; prompt tuning's virtual tokens included."
    import math, torch
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from finetune_lab.models import build_tiny, load_tokenizer
    model, _ = build_tiny(0)
    if prompt_tuned: model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    tok = load_tokenizer("tiny", "train")
    r = ROWS[2]; prompt = r["messages"][1:-1]
    head = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(r["messages"][1:], tokenize=False)
    h, a = tok(head, add_special_tokens=False)["input_ids"], tok(full[len(head):], add_special_tokens=False)["input_ids"]
    with torch.no_grad(): loss = model(input_ids=torch.tensor([h + a]), labels=torch.tensor([[-100] * len(h) + a])).loss.item()
    assert M.answer_perplexity(model, tok, [r], drop_system=True) == pytest.approx(math.exp(loss), rel=1e-4)


def test_stage_scores_share_the_run_cache_with_evaluation(tiny_runs, tmp_path):
    lora, _ = tiny_runs
    rows = [r for r in load_rows(ROOT/"data"/"tickets_raw.jsonl")[:12] if r["messages"][-1]["content"].startswith("{")][:4]
    s = E.GenSettings(max_new_tokens=8)
    s1, a1 = E.stage_scores(lora, rows, tmp_path, settings=s)
    s2, a2 = E.stage_scores(lora, rows, tmp_path, settings=s)
    assert s1["generated"] == 4 and s2["generated"] == 0 and a1 == a2
    assert s1["n"] == 4 and len(s1["category_accuracy_ci"]) == 2 and len(s1["per_row"]["category_accuracy"]) == 4
    m, _ = E.evaluate_model(lora, rows, tmp_path, bias_rows=0, settings=s)       # the evaluation lesson reuses a training lesson's answers
    assert m["generated"] == 0 and m["category_accuracy"] == s1["category_accuracy"]


def test_answer_logps_per_token_is_the_sum_over_the_answer_tokens():
    from finetune_lab.models import build_tiny
    model, tok = build_tiny(seed=1)
    prompts = [[{"role": "user", "content": "Where is my invoice?"}], [{"role": "user", "content": "Refund my broken kettle, please."}]]
    answers = [[{"role": "assistant", "content": '{"category": "billing"}'}], [{"role": "assistant", "content": "Sure."}]]
    sums, means = M.answer_logps(model, tok, prompts, answers), M.answer_logps(model, tok, prompts, answers, per_token=True)
    for p, a, s, m in zip(prompts, answers, sums, means):
        head = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        n = len(tok(tok.apply_chat_template(p + a, tokenize=False)[len(head):], add_special_tokens=False)["input_ids"])
        assert n > 1 and s < 0 and abs(s / n - m) < 1e-4
