import json, subprocess, sys
from pathlib import Path
import pytest
import torch
from finetune_lab.data import load_rows
from finetune_lab.models import load_tokenizer
from finetune_lab.rlhf import (GRPOSettings, PPOSettings, RewardSettings, pair_accuracy, prompt_rows, reward_scores, ticket_reward,
                               train_grpo, train_ppo, train_reward)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT/"tests"/"fixtures"
EXE = Path(sys.executable).parent/"finetune-lab"


@pytest.fixture(scope="module")
def pairs():
    rows = load_rows(ROOT/"data"/"tickets_prefs.jsonl")[:40]
    return {"train": rows[:24], "val": rows[24:28], "test": rows[28:40]}


@pytest.fixture(scope="module")
def reward_run(pairs, tmp_path_factory):
    return train_reward("tiny", pairs, RewardSettings(max_steps=2, eval_steps=1, eval_rows=4), tmp_path_factory.mktemp("rm"), live_plot=False)


@pytest.fixture(scope="module")
def prompts():
    rows = [r for r in load_rows(ROOT/"data"/"tickets_raw.jsonl")[:40] if r["messages"][-1]["content"].startswith("{")]
    return prompt_rows(rows[:8]), prompt_rows(rows[8:10])


def test_ticket_reward_known_cases():
    full = json.dumps({"category": "billing", "priority": "low", "product": "none", "sentiment": "neutral", "summary": "Customer asks for an invoice."})
    assert ticket_reward([full, full, '{"category": "billing"}', "Sure!", [{"role": "assistant", "content": full}]],
                         category=["billing", "refund", "billing", "billing", "billing"], priority=["low", "low", "high", "low", "high"]) == [1.0, 0.6, 0.6, 0.0, 0.8]


def test_reward_model_saves_a_standard_folder_that_scores_the_same(reward_run, pairs):
    from transformers import AutoModelForSequenceClassification
    tok = load_tokenizer("tiny", "train")
    again = AutoModelForSequenceClassification.from_pretrained(reward_run.output)
    p = pairs["test"][:3]
    a = reward_scores(reward_run.model, tok, [x["prompt"] for x in p], [x["chosen"] for x in p])
    b = reward_scores(again, tok, [x["prompt"] for x in p], [x["chosen"] for x in p])
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    acc = pair_accuracy(again, tok, pairs["test"])
    assert 0 <= acc["accuracy"] <= 1 and len(acc["chosen"]) == len(pairs["test"])


def test_reward_model_trains_on_transcripts(tmp_path):
    res = train_reward("tiny", FIX/"hh_transcripts.jsonl", RewardSettings(max_steps=1, batch_size=2, eval_steps=1), tmp_path, live_plot=False)
    assert res.steps == 1 and (Path(res.output)/"config.json").is_file()


def test_ppo_runs_and_probes(reward_run, prompts, tmp_path):
    train, probe = prompts
    res = train_ppo("tiny", train, reward_run.output, PPOSettings(max_steps=2, batch_size=2, max_new_tokens=8, probe_every=1), tmp_path, probe_prompts=probe)
    assert res.steps == 2 and [p["step"] for p in res.details["probe"]] == [0, 1, 2]
    assert any("objective/kl" in h for h in res.log_history)
    assert abs(res.details["probe"][0]["logratio_per_token"]) < 1e-6      # a fresh LoRA adapter is the reference itself
    assert all(isinstance(p["logratio_per_token"], float) for p in res.details["probe"])
    assert (Path(res.output)/"adapter_config.json").is_file()


def test_grpo_runs_with_the_rule_reward(prompts, tmp_path):
    train, probe = prompts
    res = train_grpo("tiny", train, GRPOSettings(max_steps=2, prompts_per_step=1, num_generations=2, max_new_tokens=8, probe_every=1), tmp_path, probe_prompts=probe)
    assert res.steps == 2 and any("rewards/ticket_reward/mean" in h for h in res.log_history)
    assert abs(res.details["probe"][0]["logratio_per_token"]) < 1e-6 and "logratio_per_token" in res.details["probe"][-1]
    assert (Path(res.output)/"adapter_config.json").is_file()


def test_cli_reward_and_ppo_errors(tmp_path):
    r = subprocess.run([str(EXE), "ppo", "--data", ROOT/"tests"/"fixtures"/"chat.jsonl", "--model", "tiny", "--reward", tmp_path, "--out", tmp_path/"p"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "not a reward model folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_reward_ppo_grpo_run_end_to_end(tmp_path):
    run = lambda *a: subprocess.run([str(EXE), *map(str, a)], capture_output=True, text=True, timeout=900)
    data = tmp_path/"d"
    data.mkdir()
    rows = [r for r in load_rows(ROOT/"data"/"tickets_raw.jsonl")[:60] if r["messages"][-1]["content"].startswith("{")]
    for name, part in (("train", rows[:16]), ("val", rows[16:20]), ("test", rows[20:24])):
        (data/f"{name}.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in part))
    rm = run("reward", "--data", FIX/"hh_transcripts.jsonl", "--model", "tiny", "--max-steps", "1", "--batch-size", "2", "--out", tmp_path/"rm")
    assert rm.returncode == 0, rm.stderr
    assert "held-out pair accuracy" in rm.stdout and (tmp_path/"rm"/"model"/"config.json").is_file()
    ppo = run("ppo", "--data", data, "--model", "tiny", "--reward", tmp_path/"rm"/"model", "--max-steps", "1", "--test-rows", "2", "--out", tmp_path/"ppo")
    assert ppo.returncode == 0, ppo.stderr
    assert "held-out rule reward" in ppo.stdout and (tmp_path/"ppo"/"adapter"/"adapter_config.json").is_file()
    grpo = run("grpo", "--data", data, "--model", "tiny", "--max-steps", "1", "--test-rows", "2", "--out", tmp_path/"grpo")
    assert grpo.returncode == 0, grpo.stderr
    assert (tmp_path/"grpo"/"adapter"/"adapter_config.json").is_file()
