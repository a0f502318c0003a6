"Hyperparameter search (06d_hpo): the pruner, a study shared by two worker processes, the settings file into `sft`, bad input; tiny model."
import json, subprocess, sys
from pathlib import Path
from types import SimpleNamespace
import optuna, pytest
from finetune_lab import hpo
from finetune_lab.cli import main
from finetune_lab.core import FinetuneLabError
from finetune_lab.data import check_answer, load_rows, write_jsonl
from finetune_lab.sft import SFTSettings

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent/"finetune-lab"
BASE = SFTSettings(eval_steps=1, eval_rows=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "A folder of small train/val/test splits of the real tickets."
    rows = [r for r in load_rows(ROOT/"data"/"tickets_raw.jsonl")[:80] if check_answer(r) is None]
    d = tmp_path_factory.mktemp("hpo")/"data"
    for name, part in (("train", rows[:16]), ("val", rows[16:20]), ("test", rows[20:24])): write_jsonl(d/f"{name}.jsonl", part)
    return d


def test_report_to_trial_stops_training_when_pruned():
    calls = []
    trial = SimpleNamespace(report=lambda v, s: calls.append((v, s)), should_prune=lambda: True)
    cb, control = hpo.ReportToTrial(trial), SimpleNamespace(should_training_stop=False)
    cb.on_evaluate(None, SimpleNamespace(global_step=3), control, metrics={"eval_loss": 2.5})
    assert calls == [(2.5, 3)] and control.should_training_stop and cb.pruned and cb.last == 2.5


def test_the_pruner_stops_a_bad_trial(data, tmp_path):
    "Two good trials, then one whose learning rate is too small to move the loss: the median pruner stops it before its end."
    study = hpo.open_study(tmp_path/"s.db")
    good = hpo.default_params(4)
    for p in (good, {**good, "learning_rate": 2e-3}, {**good, "learning_rate": 1e-5}): study.enqueue_trial(p)
    study = hpo.work(tmp_path/"s.db", "tiny", data, tmp_path, trials=3, steps=4, base=BASE)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"], states
    bad = study.trials[2]
    at = bad.user_attrs["steps"]
    assert at < bad.params["max_steps"]                                             # stopped before its end
    assert bad.value > max(t.intermediate_values[at] for t in study.trials[:2])     # behind both good trials at that step
    assert (tmp_path/bad.user_attrs["adapter"]/"adapter_config.json").is_file()     # what it trained is kept


def test_two_workers_share_one_sqlite_study(data, tmp_path):
    study = hpo.run_workers(2, tmp_path/"shared.db", "tiny", data, tmp_path, trials=4, steps=2, base=BASE, pruner="none")
    assert len(study.trials) == 4 and all(t.state.name == "COMPLETE" for t in study.trials)
    t0, t1 = study.trials[:2]
    assert t1.datetime_start < t0.datetime_complete and t0.datetime_start < t1.datetime_complete   # the two ran at the same time
    assert study.trials[0].params == hpo.default_params(2)                                        # the defaults ran once, first
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials[1:]}) == 3              # differently seeded samplers
    again = hpo.work(tmp_path/"shared.db", "tiny", data, tmp_path, trials=5, steps=2, base=BASE, pruner="none")
    assert len(again.trials) == 5                                                                  # a later run adds to the same study


def test_settings_file_round_trips_into_sft(data, tmp_path):
    f = hpo.write_settings(SFTSettings(max_steps=2, lora_r=4, lora_alpha=12, eval_steps=1, eval_rows=2, batch_size=2), tmp_path/"best.json")
    assert SFTSettings(**hpo.read_settings(f)).lora_alpha == 12
    assert main(["sft", "--config", str(f), "--data", str(data), "--model", "tiny", "--out", str(tmp_path/"a")]) == 0
    assert json.loads((tmp_path/"a"/"adapter"/"adapter_config.json").read_text())["r"] == 4
    assert json.loads((tmp_path/"a"/"sft_result.json").read_text())["steps"] == 2
    assert main(["sft", "--config", str(f), "--max-steps", "1", "--data", str(data), "--model", "tiny", "--out", str(tmp_path/"b")]) == 0
    assert json.loads((tmp_path/"b"/"sft_result.json").read_text())["steps"] == 1                  # a flag given wins over the file
    assert json.loads((tmp_path/"b"/"adapter"/"adapter_config.json").read_text())["lora_alpha"] == 12


@pytest.mark.parametrize("args, says", [
    (["sft", "--config", "{dir}/missing.json"], "no such settings file"),
    (["sft", "--config", "{dir}/unknown.json"], "'lora_rank' is not a SFTSettings field"),
    (["sft", "--config", "{dir}/list.json"], "a JSON list, not an object"),
    (["hpo", "--trials", "0"], "--trials 0: must be more than 0"),
    (["hpo", "--timeout", "-5"], "--timeout -5.0: must be more than 0"),
    (["hpo", "--storage", "nosuchdb://x/y"], "--storage nosuchdb://x/y"),
    (["hpo", "--pruner", "asha"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, args, says):
    (tmp_path/"unknown.json").write_text('{"lora_rank": 8}'); (tmp_path/"list.json").write_text("[1, 2]")
    r = subprocess.run([str(EXE), *[a.format(dir=tmp_path) for a in args], "--data", str(data), "--model", "tiny", "--out", str(tmp_path/"run")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_pipeline_passes_a_settings_file_to_sft_as_an_absolute_path(tmp_path, monkeypatch):
    from finetune_lab.pipeline import declared_parameters, own_parameters
    monkeypatch.chdir(tmp_path)
    got = own_parameters("sft", declared_parameters(ROOT/"nbs"/"03_sft.ipynb"), "ci", {"sft.sft_config": "hpo/best_settings.json"})
    assert got["sft_config"] == str(tmp_path/"hpo"/"best_settings.json")
