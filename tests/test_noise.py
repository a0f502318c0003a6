"The label-noise lesson's helpers (03b_noise): flipped labels, the label-issue check, choice probabilities."
import json
from pathlib import Path
import pytest
from finetune_lab.data import CATEGORIES, answer_text, get_label, load_rows, parse_answer
from finetune_lab.noise import flip_labels, suspect_labels
from finetune_lab.recipe import choice_probs

DATA = Path(__file__).parent.parent/"data"

@pytest.fixture(scope="module")
def rows():
    "The raw file's rows with a valid category (the rows a trainer would see labelled)."
    return [r for r in load_rows(DATA/"tickets_raw.jsonl") if isinstance(parse_answer(r), dict) and get_label(r) in CATEGORIES]

def test_flip_changes_only_the_label_of_the_drawn_rows(rows):
    noisy, idx = flip_labels(rows, 0.2, CATEGORIES, seed=3)
    assert len(idx) == round(0.2 * len(rows)) and len(noisy) == len(rows)
    for i, (a, b) in enumerate(zip(rows, noisy)):
        if i in set(idx):
            pa, pb = parse_answer(a), parse_answer(b)
            assert pb["category"] != pa["category"] and pb["category"] in CATEGORIES
            assert {k: v for k, v in pa.items() if k != "category"} == {k: v for k, v in pb.items() if k != "category"}
            assert list(pa) == list(pb) and b["messages"][:-1] == a["messages"][:-1]
        else: assert b is a
    assert flip_labels(rows, 0.2, CATEGORIES, seed=3) == (noisy, idx)          # seeded
    assert flip_labels(rows, 0.0, CATEGORIES) == (rows, [])

def test_suspects_find_most_flipped_labels(rows):
    "On 10% flipped labels the check flags most flips, and most of what it flags was flipped."
    noisy, idx = flip_labels(rows[:1200], 0.1, CATEGORIES, seed=0)
    flagged = set(suspect_labels(noisy, seed=0))
    hit = len(flagged & set(idx))
    assert hit / len(idx) > 0.6 and hit / len(flagged) > 0.5, (hit, len(idx), len(flagged))

def test_choice_probs_match_each_text_alone_and_pick_as_next_choice():
    import torch
    from finetune_lab.models import load_model
    from finetune_lab.recipe import next_choice
    model, tok = load_model("tiny")
    texts = ['{"category": "', 'Ticket: my parcel is late. {"category": "', "x"]
    p = choice_probs(model, tok, texts, CATEGORIES)
    assert p.shape == (3, len(CATEGORIES)) and torch.allclose(p.sum(-1), torch.ones(3))
    first = [tok(c, add_special_tokens=False)["input_ids"][0] for c in CATEGORIES]
    for text, row in zip(texts, p):                                             # a padded batch gives what each text alone gives
        with torch.no_grad(): alone = model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, -1, first].softmax(-1)
        assert torch.allclose(row, alone, atol=1e-5)
    assert [CATEGORIES[i] for i in p.argmax(-1).tolist()] == next_choice(model, tok, texts, CATEGORIES)
    with pytest.raises(ValueError, match="share a first token"): choice_probs(model, tok, texts, ["billing", "billing"])

def test_scored_run_reads_a_finished_run_back(tmp_path, monkeypatch):
    "The same model, settings and rows: the second call trains nothing; other rows train again, into another folder."
    import finetune_lab.sft as sft
    from finetune_lab.data import load_splits
    from finetune_lab.noise import scored_run
    splits = load_splits(DATA/"tickets_raw.jsonl", seed=0)
    splits = {"train": splits["train"][:16], "val": splits["val"][:4], "test": splits["test"][:6]}
    s = sft.SFTSettings(method="lora", max_steps=1, batch_size=2, eval_rows=4, eval_steps=1)
    first = scored_run("tiny", splits, splits["train"], s, tmp_path, CATEGORIES)
    assert first["steps"] == 1 and len(first["hits"]) == 6 and len(first["p_gold"]) == 6 and first["log"]
    calls = []
    real = sft.train_sft
    monkeypatch.setattr(sft, "train_sft", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = scored_run("tiny", splits, splits["train"], s, tmp_path, CATEGORIES)
    assert calls == [] and again == first
    other = scored_run("tiny", splits, splits["train"][:8], s, tmp_path, CATEGORIES)
    assert calls == [1] and other["folder"] != first["folder"] and other["rows"] == 8
