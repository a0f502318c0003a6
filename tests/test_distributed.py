"Training on several processes (06f_distributed): a 2-rank gloo run of `finetune-lab sft` on the tiny model under torchrun and accelerate launch."
import json
from pathlib import Path
import pytest
from finetune_lab import distributed as D
from finetune_lab.core import FinetuneLabError
from finetune_lab.data import check_answer, load_rows, write_jsonl
from finetune_lab.train import weights_digest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [r for r in load_rows(ROOT/"data"/"tickets_raw.jsonl")[:80] if check_answer(r) is None]
    d = tmp_path_factory.mktemp("dist")/"data"
    for name, part in (("train", rows[:16]), ("val", rows[16:20]), ("test", rows[20:24])): write_jsonl(d/f"{name}.jsonl", part)
    return d


def sft(data, out, steps=3): return ["sft", "--data", data, "--model", "tiny", "--max-steps", steps, "--batch-size", 2, "--eval-steps", 2, "--eval-rows", 4, "--out", out]


def test_two_ranks_train_the_same_weights_and_save_once(data, tmp_path):
    run = tmp_path/"run"
    r = D.launch(sft(data, run), 2, "torchrun", log=tmp_path/"torchrun.log")
    log = Path(r["log"]).read_text()
    assert r["exit"] == 0, log[-3000:]
    digests = D.rank_digests(run)
    assert sorted(digests) == [0, 1]                                                     # both ranks trained
    assert [d["step"] for d in digests[0]] == [d["step"] for d in digests[1]] == [1, 2, 3]
    assert digests[0] == digests[1]                                                      # the same weights after every step
    assert len({d["digest"] for d in digests[0]}) == 3                                   # ... which changed at every step
    assert D.ranks_agree(run) == {"ranks": 2, "steps checked": 3, "agree": True, "first_difference": None}
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("adapter", ".adapter"))) == ["adapter"]   # saved once, no leftovers
    assert json.loads((run/"sft_result.json").read_text())["steps"] == 3
    assert log.count("saved: ") == 1                                                     # rank 0 speaks for both
    from peft import PeftModel
    from finetune_lab.models import load_model
    base, _ = load_model("tiny")
    saved = PeftModel.from_pretrained(base, run/"adapter", is_trainable=True)
    assert weights_digest(saved) == digests[0][-1]["digest"]                            # what was saved is what both ranks trained


def test_accelerate_launch_multi_gpu_gives_two_gloo_ranks_on_cpu(data, tmp_path):
    r = D.launch(sft(data, tmp_path/"run", steps=2), 2, "accelerate", log=tmp_path/"accelerate.log")
    assert r["exit"] == 0, Path(r["log"]).read_text()[-3000:]
    assert D.ranks_agree(tmp_path/"run") == {"ranks": 2, "steps checked": 2, "agree": True, "first_difference": None}


PRECISION_SCRIPT = """
import os, sys
from pathlib import Path
import finetune_lab.core as C
C.cpu_bf16_native = lambda: True
C.bf16_speedup = lambda *a, **k: 3.0 if os.environ["RANK"] == "0" else 1.0   # the two processes time bf16 differently
from finetune_lab.train import TrainSettings, begin
begin(TrainSettings(device="cpu"), sys.argv[1])
Path(sys.argv[1], "precision-" + os.environ["RANK"]).write_text(C.train_precision("cpu"))
"""


def test_ranks_that_time_bf16_differently_train_in_one_precision(tmp_path):
    import os, subprocess, sys
    script = tmp_path/"ranks.py"; script.write_text(PRECISION_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "FINETUNE_LAB_PRECISION"} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path/"run")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path/"run"/f"precision-{k}").read_text() for k in (0, 1)] == ["bf16", "bf16"]   # rank 0's measurement, on both


def test_shipped_accelerate_configs_match_the_lesson_and_accelerate(tmp_path):
    for name in D.ACCELERATE_CONFIGS:
        shipped = ROOT/"configs"/"accelerate"/f"{name}.yaml"
        assert shipped.read_text() == D.write_accelerate_config(name, tmp_path/f"{name}.yaml").read_text(), f"{shipped} differs: re-run 06f_distributed"
        assert D.config_problems(shipped) == []
    with pytest.raises(FinetuneLabError, match="use one of ddp"): D.write_accelerate_config("zero4", tmp_path/"x.yaml")


def test_launch_command_refuses_impossible_layouts():
    for kw in (dict(processes=0), dict(machines=2, machine_rank=2), dict(engine="mpirun")):
        with pytest.raises(FinetuneLabError): D.launch_command(["sft"], **kw)
    assert D.launch_command(["sft"], 1, None)[1:] == ["sft"]
