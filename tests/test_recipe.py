"The recipe lesson's helpers (03a_recipe): answer field order, tone cues, few-shot prompts. No model needed."
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
