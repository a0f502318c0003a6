"""Issue 19's faults, each real and on the tiny model: weights that could run code, a second process on the same
run folder or model cache, secrets in the environment, and trainers, conversions and pipeline runs killed with SIGKILL.

A killed process is a child Python that imports this file and calls `child`; the resume happens here."""
import contextlib, functools, io, json, os, random, re, shutil, signal, subprocess, sys
from pathlib import Path

import pytest
import torch

from finetune_lab import cli
from finetune_lab.core import FinetuneLabError, claim_dir
from finetune_lab.data import load_rows
from finetune_lab.models import check_adapter, check_weights, folder_problem, load_model, prepare_model

ROOT = Path(__file__).resolve().parent.parent
TICKETS = ROOT/"data"/"tickets_raw.jsonl"


def run_cli(argv) -> tuple[int, str, str]:
    "`finetune-lab ARGV` in this process: exit status, stdout, stderr."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_line(code, err, says):
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err and says in err, err


def spawn(*args, **kw) -> subprocess.Popen:
    "A child Python running `child(*args)` from this file."
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_reliability as t; t.child(*{list(map(str, args))!r})"
    return subprocess.Popen([sys.executable, "-c", code], **kw)


# ---------- untrusted weights

@pytest.fixture
def tiny_dir(tmp_path):
    "A copy of the tiny model's folder (safetensors weights, tokenizer)."
    d = tmp_path/"tiny"; shutil.copytree(prepare_model("tiny"), d)
    return d


def pickled(folder: Path) -> Path:
    "`folder` with its safetensors weights replaced by the same tensors in a pickle file, as older checkpoints ship them."
    from safetensors.torch import load_file
    for st in folder.glob("*.safetensors"):
        torch.save(load_file(st), st.with_name("pytorch_model.bin" if st.name == "model.safetensors" else "adapter_model.bin")); st.unlink()
    return folder


def test_a_pickle_only_model_is_refused_unless_the_user_opts_in(tiny_dir, tmp_path, monkeypatch):
    reference, _ = load_model(str(tiny_dir), "generate")
    pickled(tiny_dir)
    with pytest.raises(FinetuneLabError, match="FINETUNE_LAB_ALLOW_PICKLE"): prepare_model(str(tiny_dir))
    for argv in (["sft", "--data", TICKETS, "--model", tiny_dir, "--max-steps", "1", "--out", tmp_path/"o"], ["eval", tiny_dir, "--data", TICKETS, "--test-rows", "2"]):
        code, _, err = run_cli(argv)
        one_line(code, err, "FINETUNE_LAB_ALLOW_PICKLE=1")
    assert not (tmp_path/"o").exists() or not any((tmp_path/"o").rglob("*.safetensors"))
    monkeypatch.setenv("FINETUNE_LAB_ALLOW_PICKLE", "1")   # the opt-in: the same tensors load (transformers unpickles with weights_only=True)
    model, _ = load_model(str(tiny_dir), "generate")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_a_pickle_only_adapter_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model
    base, _ = load_model("tiny", "generate")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path/"adapter")
    assert check_adapter(tmp_path/"adapter") == tmp_path/"adapter"
    pickled(tmp_path/"adapter")
    assert (tmp_path/"adapter"/"adapter_model.bin").is_file()
    with pytest.raises(FinetuneLabError, match="pickle files only"): check_adapter(tmp_path/"adapter")


def test_shipped_code_is_refused_even_with_the_pickle_opt_in(tiny_dir, tmp_path, monkeypatch):
    cfg = json.loads((tiny_dir/"config.json").read_text())
    (tiny_dir/"config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    (tiny_dir/"modeling_x.py").write_text("raise SystemExit('shipped code ran')\n")
    monkeypatch.setenv("FINETUNE_LAB_ALLOW_PICKLE", "1")
    with pytest.raises(FinetuneLabError, match="auto_map"): prepare_model(str(tiny_dir))
    code, _, err = run_cli(["sft", "--data", TICKETS, "--model", tiny_dir, "--max-steps", "1", "--out", tmp_path/"o"])
    one_line(code, err, "auto_map")


def test_no_code_path_trusts_remote_code_or_unpickles_freely():
    "Static: the library and the notebooks never pass trust_remote_code=True, and every torch.load says weights_only=True."
    sources = {p: p.read_text() for p in (ROOT/"finetune_lab").glob("*.py")}
    for nb in (ROOT/"nbs").glob("*.ipynb"):
        sources[nb] = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
    for path, text in sources.items():
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        assert not re.search(r"use_safetensors\s*=\s*False", text), path
        for m in re.finditer(r"torch\.load\(", text):
            assert "weights_only=True" in text[m.end():m.end() + 300].split("\n\n")[0], f"{path}: torch.load without weights_only=True"


# ---------- two processes, one folder

def child(kind, *args):
    "Run in a child process (see `spawn`)."
    if kind == "claim":                       # hold a run folder until stdin closes
        claim_dir(args[0]); print("claimed", flush=True); sys.stdin.read()
    elif kind == "prepare":                   # prepare the tiny model into the cache FINETUNE_LAB_CACHE names
        print(prepare_model("tiny"), flush=True)
    elif kind == "kill-conversion":           # SIGKILL after the weights are written, before the folder is complete
        import finetune_lab.models as m
        m.prepare_tokenizer(); real = m.write_manifest   # the tokenizer is converted whole first; the model's build is the one killed
        m.write_manifest = lambda folder, **k: os.kill(os.getpid(), signal.SIGKILL) if "tiny-seed0" in Path(folder).name else real(folder, **k)
        prepare_model("tiny")
    elif kind == "kill-merge":                # SIGKILL after the merged weights are written, before the tokenizer
        from transformers import PreTrainedTokenizerBase
        from finetune_lab.deploy import merge_to_folder
        PreTrainedTokenizerBase.save_pretrained = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        merge_to_folder("tiny", args[0])
    elif kind == "kill-gguf":                 # SIGKILL half-way through writing the GGUF file's tensors
        import gguf
        from finetune_lab.deploy import export_gguf
        real = gguf.GGUFWriter.write_tensors_to_file
        def half(self, *a, **k):
            self.fout[0].write(b"\0" * 1000); self.fout[0].flush(); os.kill(os.getpid(), signal.SIGKILL)
        gguf.GGUFWriter.write_tensors_to_file = half
        export_gguf(prepare_model("tiny"), args[0])
    elif kind == "kill-replace":              # replace run/adapter; SIGKILL inside the block or between the folder's two renames
        import finetune_lab.core as core
        run, when = Path(args[0]), args[1]
        claim_dir(run, resume=True)
        if when == "between":
            real = core.os.replace
            calls = []
            def replace(a, b):
                calls.append(a); real(a, b)
                if len(calls) == 1: os.kill(os.getpid(), signal.SIGKILL)   # the old folder moved aside, the new one not yet in
            core.os.replace = replace
        with core.atomic_path(run/"adapter") as tmp:
            tmp.mkdir(); (tmp/"w.safetensors").write_text("new")
            if when == "inside": os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "train":                     # train, SIGKILLed at a step or during a checkpoint's save
        train(args[0], Path(args[1]), args[2])


def test_a_second_process_cannot_take_a_claimed_run_folder(tmp_path):
    run = tmp_path/"run"
    holder = spawn("claim", run, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(FinetuneLabError, match="in use by another finetune-lab process"): claim_dir(run, resume=True)
        code, _, err = run_cli(["sft", "--data", TICKETS, "--model", "tiny", "--max-steps", "1", "--out", run, "--resume"])
        one_line(code, err, "in use by another finetune-lab process")
        assert not any(run.iterdir())
    finally: holder.communicate("")
    assert claim_dir(run) == run   # its process ended: the lock went with it


def test_two_processes_preparing_one_model_share_one_complete_folder(tmp_path):
    env = {**os.environ, "FINETUNE_LAB_CACHE": str(tmp_path/"cache")}
    kids = [spawn("prepare", stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    paths = {k.communicate()[0].strip() for k in kids}
    assert all(k.returncode == 0 for k in kids) and len(paths) == 1
    folder = Path(paths.pop())
    assert folder_problem(folder) is None
    assert not [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name]   # no half-built sibling left


def test_a_killed_conversion_leaves_no_folder_that_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_LAB_CACHE", str(tmp_path/"cache"))
    kid = spawn("kill-conversion", env={**os.environ}); kid.wait()
    assert kid.returncode == -signal.SIGKILL
    folder = tmp_path/"cache"/"models"/"tiny-seed0"
    assert folder_problem(folder) == "missing"          # the weights were written into a temporary sibling, never renamed
    assert any(".tmp-" in p.name and (p/"model.safetensors").is_file() for p in folder.parent.iterdir())   # (that sibling: killed processes clean nothing up)
    assert prepare_model("tiny") == folder and folder_problem(folder) is None
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]   # the next build cleared the killed one's leftovers
    load_model("tiny", "generate")


@pytest.mark.parametrize("when", ["inside", "between"])
def test_a_killed_writer_in_a_run_folder_is_tidied_by_the_next_claim(when, tmp_path):
    run = tmp_path/"run"; (run/"adapter").mkdir(parents=True); (run/"adapter"/"w.safetensors").write_text("previous")
    kid = spawn("kill-replace", run, when); kid.wait()
    assert kid.returncode == -signal.SIGKILL
    left = sorted(p.name.split("-")[0] for p in run.iterdir() if p.name.startswith("."))
    assert left == ([".adapter.tmp"] if when == "inside" else [".adapter.old", ".adapter.tmp"])
    assert (run/"adapter").exists() == (when == "inside")    # between the renames the real name is missing
    assert claim_dir(run, resume=True) == run
    assert [p.name for p in run.iterdir()] == ["adapter"]    # leftovers gone ...
    assert (run/"adapter"/"w.safetensors").read_text() == "previous"   # ... and the previous result back under its name


@pytest.mark.parametrize("kind,name", [("kill-merge", "merged"), ("kill-gguf", "model.gguf")])
def test_a_killed_merge_or_gguf_export_leaves_nothing_that_loads(kind, name, tmp_path):
    from finetune_lab.deploy import load_gguf
    from finetune_lab.evaluate import resolve_model
    out = tmp_path/name
    kid = spawn(kind, out); kid.wait()
    assert kid.returncode == -signal.SIGKILL
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.tmp-")]   # only the temporary sibling was written to
    with pytest.raises((FinetuneLabError, OSError, ValueError)): resolve_model(out) if kind == "kill-merge" else load_gguf(out)


# ---------- secrets

SECRETS = {"HF_TOKEN": "hf_plantedTOKEN4f9c2a", "OPENAI_API_KEY": "sk-planted-7b1e0d", "MY_APP_SECRET_KEY": "planted-secret-93ad",
           "DB_PASSWORD": "planted-password-55c1"}


def test_planted_secrets_never_reach_run_folders(tmp_path, monkeypatch):
    for k, v in SECRETS.items(): monkeypatch.setenv(k, v)
    rows = tmp_path/"t.jsonl"; rows.write_text("".join(json.dumps(r) + "\n" for r in load_rows(TICKETS)[:48]))
    out = tmp_path/"runs"
    for argv in (["data", "check", rows, "--model", "tiny", "--out", out/"data"],
                 ["sft", "--data", rows, "--model", "tiny", "--max-steps", "2", "--out", out/"sft"],
                 ["eval", "tiny", out/"sft"/"adapter", "--data", rows, "--test-rows", "2", "--out", out/"eval"]):
        code, stdout, err = run_cli(argv)
        assert code == 0, err
        assert not any(v in stdout + err for v in SECRETS.values())
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10 and (out/"eval"/"metrics.json").is_file()
    for p in files:
        blob = p.read_bytes()
        assert not any(v.encode() in blob for v in SECRETS.values()), f"a secret reached {p.relative_to(out)}"


# ---------- killed trainers

def pairs_splits():
    rows = load_rows(ROOT/"data"/"tickets_prefs.jsonl")[:48]
    return {"train": rows[:40], "val": rows[40:48]}


def sft_splits():
    rows = [r for r in load_rows(TICKETS)[:60] if r["messages"][-1]["content"].startswith("{")]
    return {"train": rows[:32], "val": rows[32:40]}


def train(kind, out: Path, kill="none"):
    "Train `kind` for 6 steps, a checkpoint every 2; `kill`: 'step-N' (SIGKILL after step N), 'save-N' (during checkpoint N's save) or 'none'/'resume'."
    from transformers import Trainer, TrainerCallback
    from finetune_lab.prefs import DPOSettings, train_dpo
    from finetune_lab.rlhf import RewardSettings, train_reward
    from finetune_lab.sft import SFTSettings, train_sft
    if kill.startswith("step-"):
        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == int(kill[5:]): os.kill(os.getpid(), signal.SIGKILL)
        extra = [Kill()]
    else: extra = []
    if kill.startswith("save-"):   # the model and optimizer of checkpoint N are on disk; its RNG state, trainer state and completion marker are not
        real = Trainer._save_rng_state
        def save_rng(self, *a, **k):
            if self.state.global_step == int(kill[5:]): os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *a, **k)
        Trainer._save_rng_state = save_rng
    common = dict(max_steps=6, eval_steps=2, eval_rows=8, logging_steps=1, batch_size=2)
    resume, kw = kill == "resume", dict(live_plot=False)
    if kind == "sft":
        return train_sft("tiny", sft_splits(), SFTSettings(**common, patience=None), out, resume=resume, extra_callbacks=extra, **kw)
    with patch_callbacks(extra):
        if kind == "dpo": return train_dpo("tiny", pairs_splits(), DPOSettings(**common), out, resume=resume, **kw)
        return train_reward("tiny", pairs_splits(), RewardSettings(**common), out, resume=resume, **kw)


@contextlib.contextmanager
def patch_callbacks(extra):
    "DPO and the reward model take no extra callbacks: add them to the ones every trainer gets."
    import finetune_lab.prefs as prefs, finetune_lab.rlhf as rlhf
    real = rlhf.training_callbacks
    def more(*a, **k): return [*real(*a, **k), *extra]
    prefs.training_callbacks = rlhf.training_callbacks = more
    try: yield
    finally: prefs.training_callbacks = rlhf.training_callbacks = real


def last_loss(res) -> float: return [h["loss"] for h in res.log_history if "loss" in h][-1]


@pytest.mark.parametrize("kind,kill", [("sft", "step-%d"), ("dpo", "step-%d"), ("reward", "save-4")])
def test_a_killed_trainer_resumes_to_the_uninterrupted_loss(kind, kill, tmp_path, monkeypatch):
    from finetune_lab.core import train_precision
    monkeypatch.setenv("FINETUNE_LAB_PRECISION", train_precision("cpu"))   # the uninterrupted run is another process: one precision for all (the next test is about the precision)
    kill = kill % random.Random(f"19-{kind}").choice([3, 5]) if "%d" in kill else kill   # a seeded random step between checkpoints
    whole = train(kind, tmp_path/"whole")
    kid = spawn("train", kind, tmp_path/"killed", kill); kid.wait()
    assert kid.returncode == -signal.SIGKILL
    ck = tmp_path/"killed"/"checkpoints"
    if kill.startswith("save-"): assert (ck/kill.replace("save", "checkpoint")).is_dir()   # half-written: it must not be loaded
    resumed = train(kind, tmp_path/"killed", "resume")
    if kill.startswith("save-"): assert any(p.name.startswith(".incomplete-checkpoint-4") for p in ck.iterdir())
    assert resumed.steps == whole.steps == 6
    assert abs(last_loss(resumed) - last_loss(whole)) <= 1e-3, (last_loss(resumed), last_loss(whole))


def test_a_resumed_run_trains_in_the_precision_it_started_in(tmp_path, monkeypatch):
    "The killed process chose fp32; the resuming one would choose bf16 (a CPU timing differs between processes): it keeps fp32."
    import finetune_lab.core as core
    monkeypatch.setenv("FINETUNE_LAB_PRECISION", "fp32")
    whole = train("sft", tmp_path/"whole")
    kid = spawn("train", "sft", tmp_path/"killed", "step-3"); kid.wait()
    assert kid.returncode == -signal.SIGKILL
    monkeypatch.delenv("FINETUNE_LAB_PRECISION")
    monkeypatch.setattr(core, "cpu_bf16_native", lambda: True); monkeypatch.setattr(core, "bf16_speedup", lambda: 9.0)
    assert core.train_precision("cpu") == "bf16"                       # what this process alone would choose
    resumed = train("sft", tmp_path/"killed", "resume")
    assert json.loads((tmp_path/"killed"/"precision.json").read_text())["precision"] == "fp32"
    assert core.train_precision("cpu") == "fp32"                       # the whole resumed run, not only its start
    assert abs(last_loss(resumed) - last_loss(whole)) <= 1e-3, (last_loss(resumed), last_loss(whole))


# ---------- a full disk, a batch that does not fit

def small_tickets(tmp_path) -> Path:
    p = tmp_path/"t.jsonl"; p.write_text("".join(json.dumps(r) + "\n" for r in load_rows(TICKETS)[:48]))
    return p


def test_a_full_disk_at_the_final_save_keeps_the_previous_result(tmp_path, monkeypatch):
    import errno
    import finetune_lab.sft as sft
    data, out = small_tickets(tmp_path), tmp_path/"run"
    assert run_cli(["sft", "--data", data, "--model", "tiny", "--max-steps", "2", "--out", out])[0] == 0
    before = {p.name: p.read_bytes() for p in (out/"adapter").iterdir()}
    def full(trainer, tok, folder, drop=()):   # the disk fills half-way through writing the adapter
        Path(folder).mkdir(parents=True, exist_ok=True); (Path(folder)/"adapter_model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder)/"adapter_model.safetensors"))
    monkeypatch.setattr(sft, "save_trained", full)
    code, _, err = run_cli(["sft", "--data", data, "--model", "tiny", "--max-steps", "3", "--out", out, "--resume"])
    one_line(code, err, "the disk is full")
    assert "intact" in err and "--resume" in err
    assert {p.name: p.read_bytes() for p in (out/"adapter").iterdir()} == before   # the previous adapter, byte for byte
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_a_batch_that_does_not_fit_is_reported_at_step_1(tmp_path, monkeypatch):
    from transformers import LlamaModel   # the decoder: TRL's loss may skip the causal-LM wrapper's forward
    real = LlamaModel.forward
    @functools.wraps(real)                      # (the Trainer reads the signature: it must still take labels)
    def forward(self, input_ids=None, **kw):   # this "device" holds 2 rows per forward pass
        pos = kw.get("position_ids")   # padding-free batches are one packed row: count the sequences where positions restart
        rows = int((pos == 0).sum()) if pos is not None else input_ids.shape[0]
        if rows > 2 and self.training: raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, input_ids=input_ids, **kw)
    monkeypatch.setattr(LlamaModel, "forward", forward)
    data = small_tickets(tmp_path)
    code, _, err = run_cli(["sft", "--data", data, "--model", "tiny", "--max-steps", "3", "--batch-size", "4", "--out", tmp_path/"a"])
    one_line(code, err, "out of memory at step 1")
    assert "--batch-size 2 --grad-accum 2" in err
    assert run_cli(["sft", "--data", data, "--model", "tiny", "--max-steps", "3", "--batch-size", "2", "--grad-accum", "2", "--out", tmp_path/"b"])[0] == 0
