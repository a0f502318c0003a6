import json, subprocess, sys
from collections import Counter
from pathlib import Path
import pytest
from finetune_lab.core import FinetuneLabError
from finetune_lab.data import (DataSettings, TICKET_SCHEMA, check_answer, check_dataset, find_pii, get_label, load_rows, mask_pii,
                               save_check, split)
from finetune_lab.models import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DATA, FIX = ROOT/"data", Path(__file__).resolve().parent/"fixtures"
EXE = Path(sys.executable).parent/"finetune-lab"


@pytest.fixture(scope="module")
def tok(): return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def raw_check(tok):
    return check_dataset(DATA/"tickets_raw.jsonl", DataSettings(group_key="phrasing"), tokenizer=tok)


@pytest.fixture(scope="module")
def manifest(): return json.loads((DATA/"tickets_manifest.json").read_text())


def test_report_finds_every_planted_defect_at_its_count(raw_check, manifest):
    r = raw_check.report
    assert r.rows_in == manifest["rows"] >= 2000
    assert {k: r.counts[k] for k in manifest["counts"]} == manifest["counts"]
    assert r.rows_in == r.rows_kept + r.rows_quarantined


def test_flagged_rows_are_the_planted_ones(raw_check, manifest):
    p = manifest["planted"]
    by = {}
    for q in raw_check.quarantine:
        for reason in q["reasons"]: by.setdefault(reason, set()).add(q["line"])
    for k in ("empty_output", "invalid_output", "too_short", "too_long"): assert by[k] == set(p[k]), k
    assert by["label_conflicts"] == {l for pair in p["label_conflicts"] for l in pair}
    for k in ("exact_duplicates", "near_duplicates"):   # one row of each planted pair: the later one
        assert by[k] == {max(pair) for pair in p[k]}, k


def test_splits_keep_groups_together_and_do_not_leak(raw_check):
    s = raw_check.splits
    assert raw_check.report.split["leaks_after_split"] == 0
    phr = {name: {r["meta"]["phrasing"] for r in rows} for name, rows in s.items()}
    assert not (phr["train"] & phr["val"]) and not (phr["train"] & phr["test"]) and not (phr["val"] & phr["test"])
    n = sum(map(len, s.values()))
    assert n == raw_check.report.rows_kept
    for name, share in zip(("train", "val", "test"), (0.8, 0.1, 0.1)): assert abs(len(s[name]) / n - share) < 0.02
    for name in ("val", "test"):   # stratified: each category's share within 4 points of train's
        tr, other = Counter(map(get_label, s["train"])), Counter(map(get_label, s[name]))
        for c in tr: assert abs(tr[c] / len(s["train"]) - other[c] / len(s[name])) < 0.04, (name, c)


def test_saved_outputs_account_for_every_row(raw_check, tmp_path):
    out = save_check(raw_check, tmp_path/"out")
    rep = json.loads((out/"report.json").read_text())
    q = [json.loads(l) for l in (out/"quarantine.jsonl").read_text().splitlines()]
    kept = sum(len((out/f"{s}.jsonl").read_text().splitlines()) for s in ("train", "val", "test"))
    assert rep["rows_in"] == kept + len(q) == rep["rows_kept"] + rep["rows_quarantined"]
    assert all(e["reasons"] and isinstance(e["line"], int) for e in q)
    for key in ("exact_duplicates", "near_duplicates", "empty_output", "invalid_output", "label_conflicts", "pii", "too_short", "too_long", "leakage"):
        assert key in rep["counts"]
    assert (out/"report.md").read_text().startswith("# Data quality report")
    assert all((out/p).stat().st_size > 1000 for p in rep["plots"]) and len(rep["plots"]) >= 3
    assert load_rows(out/"train.jsonl")[0]["messages"][-1]["role"] == "assistant"


def test_split_is_seeded():
    rows = load_rows(DATA/"tickets_raw.jsonl")[:300]
    a, b, c = split(rows, seed=1), split(rows, seed=1), split(rows, seed=2)
    lines = lambda s: {k: [r["line"] for r in v] for k, v in s.items()}
    assert lines(a) == lines(b) != lines(c)
    with pytest.raises(FinetuneLabError, match="ratios"): split(rows, ratios=(0.5, 0.2, 0.2))


def test_generator_reproduces_the_shipped_files():
    r = subprocess.run([sys.executable, str(DATA/"make_tickets.py"), "--check"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr


def test_preference_file_is_clean_and_varied(tok):
    rows = load_rows(DATA/"tickets_prefs.jsonl")
    assert len(rows) >= 2000 and all("chosen" in r for r in rows)
    assert all(check_answer(r, TICKET_SCHEMA) is None for r in rows)       # chosen answers are valid
    assert Counter(r["meta"]["rejection"] for r in rows).keys() == {"wrong_category", "invalid_json", "chatty_prose", "wrong_product"}


# --- formats ---------------------------------------------------------------------------------------

def test_each_format_normalises_to_messages():
    chat = load_rows(FIX/"chat.jsonl")
    assert chat[1]["messages"][0]["role"] == "system" and chat[0]["line"] == 1
    alp = load_rows(FIX/"alpaca.json")
    assert alp[0]["messages"][0]["content"].startswith("Triage this support ticket.\n\nThe blender")
    assert alp[1]["messages"][0]["content"].endswith("laptop.")          # empty input: no blank tail
    pc = load_rows(FIX/"prompt_completion.csv")
    assert pc[2]["messages"][0]["content"].startswith('He said "hello, world"') and pc[2]["line"] == 4
    assert get_label(pc[0]) == "billing"


def test_preferences_and_transcripts():
    p = load_rows(FIX/"preference.jsonl")
    assert p[1]["prompt"] == [{"role": "user", "content": "My card was declined when I renewed the plan."}]
    assert p[1]["chosen"][0]["role"] == "assistant"
    hh = load_rows(FIX/"hh_transcripts.jsonl")
    assert [m["role"] for m in hh[1]["prompt"]] == ["user", "assistant", "user"]
    assert hh[1]["rejected"][0]["content"] == "No." and hh[1]["chosen"][0]["content"].startswith("Then please")


def test_parquet_and_hf_datasets(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict
    rows = [json.loads(l) for l in (FIX/"chat.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path/"chat.parquet")
    assert [r["messages"] for r in load_rows(tmp_path/"chat.parquet")] == [r["messages"] for r in rows]
    ds = Dataset.from_list(rows)
    assert len(load_rows(ds)) == 4
    assert len(load_rows(DatasetDict(train=ds, test=ds))) == 8


def test_preference_defects_are_reported_not_crashed(tok, tmp_path):
    f = tmp_path/"bad_prefs.jsonl"
    good = {"prompt": "Where is my parcel? It is late.", "chosen": "It ships today.", "rejected": "No idea."}
    f.write_text("\n".join(json.dumps(r) for r in [good, {**good, "rejected": "It ships today."}, {**good, "chosen": "  "},
                                                  {**good, "prompt": "Can I change the delivery address?"}]) + "\n")
    rep = check_dataset(f, DataSettings(schema=None), tokenizer=tok).report
    assert rep.counts["identical_pair"] == 1 and rep.counts["empty_output"] == 1
    assert rep.rows_kept == 2
    missing = tmp_path/"missing_prompt.jsonl"                      # a pair without a prompt: quarantined, not an error
    missing.write_text("\n".join(json.dumps(r) for r in [good, {"chosen": "a", "rejected": "b"}, {**good, "prompt": ""}]) + "\n")
    check = check_dataset(missing, DataSettings(schema=None), tokenizer=tok)
    assert check.report.counts["missing_prompt"] == 2 and [q["line"] for q in check.quarantine] == [2, 3]
    broken = tmp_path/"broken_transcript.jsonl"; broken.write_text(json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}) + "\n")
    with pytest.raises(FinetuneLabError, match=r"broken_transcript.jsonl:1: .*Assistant turn"): load_rows(broken)


def test_pii():
    text = "mail ana.silva@example.com, phone +1 (415) 555-0132, card 4111 1111 1111 1111, order NW-48213 for $1,299.00 on March 3"
    assert [k for k, _ in find_pii(text)] == ["email", "card", "phone"]
    assert mask_pii(text).count("[") == 3 and "NW-48213" in mask_pii(text)
    assert find_pii("card 4111 1111 1111 1112") == []                        # fails Luhn
    assert find_pii("tracking 2025 03 03, 10 items, 12 15") == []


# --- the CLI on each format, and on broken files -----------------------------------------------------

def cli(*args):
    return subprocess.run([str(EXE), "data", "check", *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", ["chat.jsonl", "alpaca.json", "prompt_completion.csv", "preference.jsonl", "hh_transcripts.jsonl"])
def test_cli_checks_each_format(name, tmp_path):
    r = cli(FIX/name, "--out", tmp_path, "--model", "tiny")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path/"report.json").read_text())
    assert rep["rows_in"] == rep["rows_kept"] + rep["rows_quarantined"] > 0
    assert "rows in" in r.stdout


def test_cli_json_output(tmp_path):
    r = cli(FIX/"chat.jsonl", "--out", tmp_path, "--json", "--model", "tiny")
    assert r.returncode == 0 and json.loads(r.stdout)["rows_in"] == 4


def _bad_files(tmp):
    msg = lambda **kw: json.dumps({"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "ok"}], **kw})
    files = {
        "truncated.jsonl": (msg() + "\n" + msg()[:30] + "\n").encode(),
        "bad_utf8.jsonl": msg().encode() + b"\n" + b'{"messages": "caf\xe9"}\n',
        "missing_keys.jsonl": (msg() + "\n" + json.dumps({"question": "hi", "answer": "yo"}) + "\n").encode(),
        "wrong_type.jsonl": (json.dumps({"messages": "hello"}) + "\n").encode(),
        "wrong_content.jsonl": (json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}) + "\n").encode(),
        "bad_role.jsonl": (json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "x"}]}) + "\n").encode(),
        "empty.jsonl": b"\n\n",
        "notes.txt": b"hello",
        "extra_fields.csv": b'prompt,completion\n"a b c d",ok,surplus\n',
        "header_only.csv": b"prompt,completion\n",
        "not_array.json": b'{"a": 1, "b": 2}',
    }
    for name, content in files.items(): (tmp/name).write_bytes(content)
    return files


@pytest.mark.parametrize("name,expect", [("truncated.jsonl", "truncated.jsonl:2"), ("bad_utf8.jsonl", "bad_utf8.jsonl:2: not valid UTF-8"),
                                         ("missing_keys.jsonl", "missing_keys.jsonl:2: unknown row format"),
                                         ("wrong_type.jsonl", "wrong_type.jsonl:1: 'messages' must be"),
                                         ("wrong_content.jsonl", "content must be text"), ("bad_role.jsonl", "role 'bot'"),
                                         ("empty.jsonl", "empty"), ("notes.txt", "unknown file type"),
                                         ("extra_fields.csv", "extra_fields.csv:2: more fields"), ("header_only.csv", "no rows"),
                                         ("not_array.json", "array of objects")])
def test_cli_malformed_input_is_one_line_exit_2(name, expect, tmp_path):
    _bad_files(tmp_path)
    r = cli(tmp_path/name, "--out", tmp_path/"out", "--model", "tiny")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert expect in r.stderr


def test_cli_missing_file_and_bad_options(tmp_path):
    assert cli(tmp_path/"nope.jsonl").returncode == 2
    assert cli(FIX/"chat.jsonl", "--ratios", "a,b").returncode == 2
    assert cli(FIX/"chat.jsonl", "--format", "yaml").returncode == 2
