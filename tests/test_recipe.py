"The recipe lesson's helpers (03a_recipe): answer field order, tone cues, few-shot prompts, the weighted loss and choosing a checkpoint on a watched field (tiny model)."
import json, re, importlib.util
from pathlib import Path
import pytest
from finetune_lab.data import load_rows, answer_text, get_label
from finetune_lab.recipe import PRIORITY_LAST, reorder_answer, reorder_splits, line_patterns, tone_cue, by_group, pick_examples, with_examples

DATA = Path(__file__).parent.parent/"data"

@pytest.fixture(scope="module")
def rows(): return load_rows(DATA/"tickets_raw.jsonl")

@pytest.fixture(scope="module")
def bank():
    spec = importlib.util.spec_from_file_location("ticket_bank", DATA/"ticket_bank.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m

def test_reorder_keeps_every_answer(rows):
    "Every row's answer keeps its content; the data's own order gives back the same text; priority comes last."
    data_order = ("category", "priority", "product", "sentiment", "summary")
    for r in rows:
        new = reorder_answer(r)
        try: a = json.loads(answer_text(r))
        except json.JSONDecodeError: assert new == r; continue
        if not isinstance(a, dict): assert new == r; continue
        assert json.loads(answer_text(new)) == a
        assert reorder_answer(r, data_order) == r
        if "priority" in a and set(a) <= set(PRIORITY_LAST): assert list(json.loads(answer_text(new)))[-1] == "priority"
        assert new["messages"][:-1] == r["messages"][:-1]

def test_reorder_splits_counts(rows):
    out = reorder_splits({"train": rows[:10], "test": rows[10:13]})
    assert {k: len(v) for k, v in out.items()} == {"train": 10, "test": 3}

def test_unnamed_keys_follow():
    r = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": '{"extra": 1, "priority": "low", "category": "other"}'}]}
    assert list(json.loads(answer_text(reorder_answer(r)))) == ["category", "priority", "extra"]

def test_every_tone_line_is_found(bank):
    "Each template, its slots filled with any text, is found by its own list's pattern, and cues follow the rule's precedence."
    cues = {"urgent": line_patterns(bank.URGENT_LINES), "angry": line_patterns(bank.ANGRY_LINES), "polite": line_patterns(bank.POLITE_LINES)}
    fill = lambda t: re.sub(r"\{\w+\}", "Zq 12", t)
    for name, lines in (("urgent", bank.URGENT_LINES), ("angry", bank.ANGRY_LINES), ("polite", bank.POLITE_LINES)):
        for t in lines: assert tone_cue("My order is late. " + fill(t).lower(), cues) == name, t
    assert tone_cue(fill(bank.POLITE_LINES[0]) + " " + fill(bank.URGENT_LINES[0]), cues) == "urgent"
    assert tone_cue("Where is my parcel?", cues) == "none"

def test_by_group_interval():
    g = by_group([1, 1, 0, 0, 1], ["a", "a", "b", "b", "b"])
    assert list(g) == ["a", "b"] and g["a"]["acc"] == 1.0 and g["b"]["n"] == 3
    assert g["b"]["ci"][0] <= 1/3 <= g["b"]["ci"][1]

def test_few_shot_prompts(rows):
    shots = pick_examples(rows, 6, seed=1)
    labels = [get_label(r) for r in shots]
    assert len(set(labels)) == 6 and None not in labels                       # one per category, never an unlabelled row
    assert pick_examples(rows, 6, seed=1) == shots and pick_examples(rows, 6, seed=2) != shots
    assert len(pick_examples(rows[:3], 8)) == 3                               # never more than there are
    row = rows[0]; out = with_examples(row, shots[:2])
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert out["messages"][-2:] == row["messages"][-2:]
    no_sys = {"messages": row["messages"][1:]}
    assert [m["role"] for m in with_examples(no_sys, shots[:1])["messages"]] == ["user", "assistant", "user", "assistant"]

def test_next_choice_is_greedy_decoding(rows):
    "On the tiny model, the teacher-forced pick equals the first token greedy generation writes; choices sharing a first token are refused."
    import torch
    from finetune_lab.models import load_model, load_tokenizer
    from finetune_lab.recipe import field_prompt, next_choice
    model, _ = load_model("tiny")
    tok = load_tokenizer("tiny", "generate")
    texts = [field_prompt(tok, r, "priority") for r in rows[:6]]
    assert all(t.endswith('"priority": "') and "You triage" not in t for t in texts)   # the shared system prompt dropped, as in training
    choices = ["low", "medium", "high", "urgent"]
    first = [tok(c, add_special_tokens=False)["input_ids"][0] for c in choices]
    picks = next_choice(model, tok, texts, choices, batch_size=4)
    for t, p in zip(texts, picks):
        with torch.no_grad(): logits = model(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, -1]
        assert choices[int(logits[first].argmax())] == p
    with pytest.raises(ValueError): next_choice(model, tok, texts, ["high", "high priority"])

def test_field_loss_weighs_only_the_value_token(rows):
    "Weight 1 is the usual mean cross-entropy; weight w adds (w − 1) × the loss of the first priority-value token, over the same count; a row without the field is unchanged."
    import torch
    from types import SimpleNamespace
    from finetune_lab.models import load_tokenizer
    from finetune_lab.recipe import field_loss, value_positions
    tok = load_tokenizer("tiny", "train")
    ids = tok(answer_text(rows[0]), add_special_tokens=False)["input_ids"]
    labels = torch.tensor([[-100, -100, *ids]]); logits = torch.randn(1, labels.shape[1], len(tok))
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")
    (at,) = value_positions(labels[0, 1:].tolist(), tok('"priority": "', add_special_tokens=False)["input_ids"][1:])
    assert tok.decode(labels[0, 1:][at]).strip() and get_label(rows[0], "priority").startswith(tok.decode(labels[0, 1:][at]).strip())
    n = (labels[0, 1:] != -100).sum()
    loss = lambda w, lab=labels: field_loss(tok, "priority", w)(SimpleNamespace(logits=logits), lab).item()
    assert loss(1) == pytest.approx((ce.sum() / n).item(), rel=1e-5)
    assert loss(10) == pytest.approx(((ce.sum() + 9 * ce[at]) / n).item(), rel=1e-5)
    other = torch.tensor([[-100, -100, *tok('{"category": "billing", "summary": "x"}', add_special_tokens=False)["input_ids"]]])
    other = torch.nn.functional.pad(other, (0, labels.shape[1] - other.shape[1]), value=-100)
    assert loss(10, other) == pytest.approx(loss(1, other), rel=1e-6)

def test_the_best_checkpoint_follows_a_metric_a_callback_adds(rows, tmp_path):
    "`select_on` names a metric a callback writes at each evaluation: the kept checkpoint is its best step, not the loss's; FieldWatch writes `eval_priority_accuracy`."
    from transformers import TrainerCallback
    from finetune_lab.data import check_answer
    from finetune_lab.sft import SFTSettings, train_sft
    class Made(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw): metrics["eval_made"] = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3}[state.global_step]
    ok = [r for r in rows[:80] if check_answer(r) is None]
    splits = {"train": ok[:16], "val": ok[16:20]}
    cfg = SFTSettings(method="lora", max_steps=4, batch_size=4, eval_steps=1, eval_rows=4, patience=None)
    res = train_sft("tiny", splits, cfg, tmp_path/"made", live_plot=False, extra_callbacks=[Made()], select_on="eval_made")
    assert res.trainer.state.best_global_step == 2 and res.steps == 4
    res = train_sft("tiny", splits, SFTSettings(**{**vars(cfg), "patience": 1}), tmp_path/"stop", live_plot=False, extra_callbacks=[Made()], select_on="eval_made")
    assert res.steps == 3                                                  # no better than step 2 at step 3: early stopping (patience 1) ends it
    from types import SimpleNamespace
    from finetune_lab.models import load_model, load_tokenizer
    from finetune_lab.recipe import FieldWatch
    watch, metrics = FieldWatch(load_tokenizer("tiny", "generate"), ok[:4], "priority", ["low", "medium", "high", "urgent"]), {}
    watch.on_evaluate(None, SimpleNamespace(global_step=7), None, model=load_model("tiny")[0], metrics=metrics)
    assert metrics == {"eval_priority_accuracy": watch.history[-1][1]} and watch.history[-1][0] == 7
