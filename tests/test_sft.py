import json, subprocess, sys
from pathlib import Path
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback
from finetune_lab.core import FinetuneLabError
from finetune_lab.data import check_answer, load_rows
from finetune_lab.models import load_tokenizer, prepare_model
from finetune_lab.metrics import QUICK_METRICS, score
from finetune_lab.sft import SFTSettings, sft_trainer, train_sft
from finetune_lab.train import DONE, METHODS, last_checkpoint, method_unavailable

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent/"finetune-lab"


@pytest.fixture(scope="module")
def splits():
    rows = [r for r in load_rows(ROOT/"data"/"tickets_raw.jsonl")[:200] if check_answer(r) is None]
    return {"train": rows[:48], "val": rows[48:56], "test": rows[56:64]}


def small(method, **kw): return SFTSettings(method=method, **{"max_steps": 2, "batch_size": 4, "eval_steps": 1, "eval_rows": 8, **kw})


@pytest.mark.parametrize("method", ["full", "lora", "ia3", "prompt"])
def test_each_method_trains_and_saves_a_standard_folder(method, splits, tmp_path):
    res = train_sft("tiny", splits, small(method), tmp_path/method, live_plot=False)
    out = Path(res.output)
    assert res.steps == 2 and res.best_val_loss is not None and res.peak_memory_mb > 0
    shown = res.report(tmp_path)                        # what a lesson prints: no log history, the path inside the run folder
    assert shown["output"] == f"{method}/{out.name}" and "log_history" not in shown
    assert (tmp_path/method/"tb").is_dir() and any((tmp_path/method/"tb").iterdir())
    if method == "full":
        assert out.name == "model" and (out/"model.safetensors").is_file()
        assert res.trainable_params == res.total_params
        assert AutoModelForCausalLM.from_pretrained(out).num_parameters() == res.total_params
    else:
        from peft import AutoPeftModelForCausalLM
        assert out.name == "adapter" and (out/"adapter_config.json").is_file()
        assert 0 < res.trainable_params < res.total_params / 10
        base = res.model.get_base_model()   # frozen in the training precision (bf16 on a CPU with fast native bf16): reload it so
        m = AutoPeftModelForCausalLM.from_pretrained(out, dtype=base.dtype, attn_implementation=base.config._attn_implementation)
        tok = load_tokenizer("tiny", "generate")
        enc = tok.apply_chat_template([splits["test"][0]["messages"][:-1]], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad(): a, b = m(**enc).logits, res.model(**enc).logits
        tol = 1e-4 if base.dtype == torch.float32 else 2e-2     # bf16 keeps ~3 significant digits
        assert torch.allclose(a.float(), b.float(), atol=tol)   # the reloaded adapter computes what the trained one did


class KillAt(TrainerCallback):
    "Simulate a kill right after the checkpoint of `step` is saved."
    def __init__(self, step): self.step = step
    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step: raise KeyboardInterrupt


def test_resume_after_kill_gives_the_same_final_loss(splits, tmp_path):
    cfg = small("lora", max_steps=6, eval_steps=2, logging_steps=1, patience=None)
    full = train_sft("tiny", splits, cfg, tmp_path/"a", live_plot=False)
    with pytest.raises(KeyboardInterrupt):
        train_sft("tiny", splits, cfg, tmp_path/"b", live_plot=False, extra_callbacks=[KillAt(4)])
    ck = tmp_path/"b"/"checkpoints"
    (ck/"checkpoint-5").mkdir(); (ck/"checkpoint-5"/"adapter_model.safetensors").write_bytes(b"half")   # a save cut short
    assert last_checkpoint(ck).name == "checkpoint-4"
    with pytest.raises(FinetuneLabError, match="resume"): train_sft("tiny", splits, cfg, tmp_path/"b", live_plot=False)
    resumed = train_sft("tiny", splits, cfg, tmp_path/"b", resume=True, live_plot=False)
    losses = lambda r: [(h["step"], round(h["loss"], 5)) for h in r.log_history if "loss" in h and h["step"] > 4]
    assert resumed.steps == 6 and losses(resumed) == losses(full)
    assert resumed.best_val_loss == pytest.approx(full.best_val_loss, abs=1e-6)


def test_incomplete_checkpoints_are_set_aside(tmp_path):
    for n, done in [(2, True), (4, True), (6, False)]:
        (tmp_path/f"checkpoint-{n}").mkdir()
        if done: (tmp_path/f"checkpoint-{n}"/DONE).write_text("{}")
    assert last_checkpoint(tmp_path).name == "checkpoint-4"
    assert not (tmp_path/"checkpoint-6").exists()
    assert last_checkpoint(tmp_path/"nothing") is None


def test_completion_only_labels_end_with_eos(splits, tmp_path):
    from trl import SFTConfig
    tok = load_tokenizer("tiny", "train")
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=512)
    model = AutoModelForCausalLM.from_pretrained(prepare_model("tiny"))
    batch = next(iter(sft_trainer(model, tok, args, splits["train"][:2], []).get_train_dataloader()))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    learnt = tok.decode(ids[labels != -100])
    assert learnt.startswith('{"category"') and learnt.rstrip().endswith("<|im_end|>")
    assert "You triage" not in learnt and splits["train"][0]["messages"][1]["content"][:30] not in learnt  # no loss on system prompt or ticket


def test_qlora_is_skipped_on_cpu_not_an_error(splits, tmp_path):
    if torch.cuda.is_available(): pytest.skip("this machine has CUDA")
    assert "CUDA" in method_unavailable("qlora", "cpu")
    with pytest.raises(FinetuneLabError, match="QLoRA needs a CUDA GPU"): train_sft("tiny", splits, small("qlora"), tmp_path/"q")


def test_quick_metrics_known_cases(splits):
    rows = splits["test"][:3]
    right = rows[0]["messages"][-1]["content"]
    wrong_cat = json.dumps({**json.loads(rows[1]["messages"][-1]["content"]), "category": "nonsense"})
    s = {k: round(v, 3) for k, v in score([right, wrong_cat, "Sure! {"], rows, QUICK_METRICS).items()}
    assert s == {"n": 3, "json_valid": round(2 / 3, 3), "schema_valid": round(1 / 3, 3), "category_accuracy": round(1 / 3, 3)}


def test_cli_sft_and_its_errors(tmp_path):
    run = lambda *a: subprocess.run([str(EXE), "sft", *map(str, a)], capture_output=True, text=True, timeout=600)
    data = tmp_path/"d"
    data.mkdir()
    rows = [r for r in load_rows(ROOT/"data"/"tickets_raw.jsonl")[:80] if check_answer(r) is None]
    for name, part in (("train", rows[:24]), ("val", rows[24:30]), ("test", rows[30:34])):
        (data/f"{name}.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in part))
    r = run("--data", data, "--model", "tiny", "--max-steps", "2", "--batch-size", "4", "--eval-steps", "1", "--out", tmp_path/"run", "--test-rows", "2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path/"run"/"adapter"/"adapter_config.json").is_file() and "held-out test" in r.stdout
    again = run("--data", data, "--model", "tiny", "--max-steps", "2", "--out", tmp_path/"run")
    assert again.returncode == 2 and "already holds a run" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    bad = run("--data", tmp_path/"nowhere.jsonl", "--model", "tiny", "--out", tmp_path/"other")
    assert bad.returncode == 2 and "no such file" in bad.stderr
    if not torch.cuda.is_available():
        q = run("--data", data, "--model", "tiny", "--method", "qlora")
        assert q.returncode == 0 and "skipped qlora" in q.stdout


def test_prompt_tuned_generation_matches_step_by_step_decoding():
    "Our soft-prompt path gives the logits of a full forward pass at every step, padded rows included (peft's own generate drifts)."
    from peft import get_peft_model
    from finetune_lab.models import _soft_prompt_generate
    path, tok = prepare_model("tiny"), load_tokenizer("tiny", "generate")
    torch.manual_seed(0)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(path), METHODS["prompt"].peft(SFTSettings(method="prompt"), path)).eval()
    with torch.no_grad(): m.prompt_encoder.default.embedding.weight.normal_(0, 1.0)
    convs = [[{"role": "user", "content": q}] for q in ("hello there", "a much longer question about the shipping of my order")]
    enc = tok.apply_chat_template(convs, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = _soft_prompt_generate(m, enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    for b, conv in enumerate(convs):
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        for t in range(4):
            with torch.no_grad(): ref = m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            assert torch.allclose(out.logits[t][b], ref, atol=1e-4)
            ids = torch.cat([ids, out.sequences[b:b+1, t:t+1]], 1)
