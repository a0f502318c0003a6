"""`finetune-lab run`: parameters reach the right steps, steps hand artifacts on, failures are one line, --resume skips.

These run the pipeline on five small stand-in notebooks (real papermill, real kernels) named like the lessons,
so they take seconds; the real lessons run in `finetune-lab run --profile ci` (.ci/run) and in 07_pipeline's test."""
import contextlib, io, json
from pathlib import Path

import nbformat
import pytest

from finetune_lab import pipeline
from finetune_lab.cli import main
from finetune_lab.core import FinetuneLabError

PARAMS = {
    "data": 'model_name = "m"\ndata_path = "d.jsonl"\nout_dir = "o"\nseed = 1',
    "sft": 'model_name = "m"\ndata_path = "d.jsonl"\nout_dir = "o"\nmax_steps = 5\nmethod = "lora"\nseed = 1',
    "dpo": 'model_name = "m"\nprefs_path = "p.jsonl"\ndata_path = "d.jsonl"\nsft_adapter = "a"\nout_dir = "o"\nmax_steps = 5\nseed = 1',
    "rlhf": 'model_name = "m"\nprefs_path = "p.jsonl"\ndata_path = "d.jsonl"\nsft_adapter = "a"\nout_dir = "o"\nmax_steps = 5\nseed = 1',
    "eval": 'model_name = "m"\ndata_path = "d.jsonl"\nruns_dir = "r"\nsft_adapter = "a"\nout_dir = "o"\nseed = 1',
}

BODY = {
    "data": '''from finetune_lab.core import FinetuneLabError
if not Path(data_path).is_file(): raise FinetuneLabError(f"{data_path}: no such file", fix="pass an existing file")''',
    "sft": '''(Path(out_dir)/method/"adapter").mkdir(parents=True, exist_ok=True)
(Path(out_dir)/method/"adapter"/"adapter_config.json").write_text("{}")''',
    "dpo": '''assert Path(sft_adapter, "adapter_config.json").is_file(), sft_adapter
(Path(out_dir)/"adapter").mkdir(parents=True, exist_ok=True)''',
    "rlhf": '''assert Path(sft_adapter, "adapter_config.json").is_file(), sft_adapter
(Path(out_dir)/"ppo"/"adapter").mkdir(parents=True, exist_ok=True)''',
    "eval": '''stages = {k: 0.5 for k, p in {"sft_lora": "sft/lora/adapter", "dpo": "dpo/adapter", "ppo": "rlhf/ppo/adapter"}.items() if (Path(runs_dir)/p).is_dir()}
Path(out_dir, "metrics.json").write_text(json.dumps({"models": {"base": {"category_accuracy": 0.0}, **{k: {"category_accuracy": v} for k, v in stages.items()}}}))''',
}


@pytest.fixture
def nbs(tmp_path):
    "Stand-in lesson notebooks: each records its parameters; `sft` has a cell tagged `lesson` that fails."
    d = tmp_path/"nbs"; d.mkdir()
    (d/"d.jsonl").write_text("{}\n")
    for step, nb_name in ((s.name, s.notebook) for s in pipeline.STEPS.values()):
        cells = [nbformat.v4.new_code_cell(PARAMS[step]),
                 nbformat.v4.new_code_cell("import json\nfrom pathlib import Path\nPath(out_dir).mkdir(parents=True, exist_ok=True)"),
                 nbformat.v4.new_code_cell(BODY[step])]
        cells[0].metadata["tags"] = ["parameters"]
        if step == "sft":
            lesson = nbformat.v4.new_code_cell('raise RuntimeError("a lesson-only cell ran")'); lesson.metadata["tags"] = ["lesson"]
            cells.append(lesson)
        cells.append(nbformat.v4.new_code_cell('Path(out_dir, "measured.json").write_text(json.dumps({k: v for k, v in globals().items() '
                                               'if k in ("model_name", "data_path", "max_steps", "seed", "sft_adapter", "runs_dir")}))'))
        nb = nbformat.v4.new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
        nbformat.write(nb, str(d/nb_name))
    return d


def test_parameters_wiring_and_resume(nbs, tmp_path):
    run = tmp_path/"run"
    lines = []
    m = pipeline.run_pipeline("ci", run, params={"max_steps": 3, "sft.max_steps": 7, "data_path": str(nbs/"d.jsonl")}, nbs=nbs, echo=lines.append)
    steps = m["steps"]
    assert list(steps) == list(pipeline.STEPS)
    got = {s: r["measured"] for s, r in steps.items()}
    assert got["sft"]["max_steps"] == 7 and got["dpo"]["max_steps"] == 3 and got["rlhf"]["max_steps"] == 3  # step.key beats key
    assert all(g["data_path"] == str(nbs/"d.jsonl") for g in got.values())                               # -p data_path reaches every step
    assert got["dpo"]["sft_adapter"] == str(run.resolve()/"sft"/"lora"/"adapter")                          # wiring: SFT adapter handed on
    assert got["eval"]["runs_dir"] == str(run.resolve()) and got["data"]["model_name"] == "tiny"            # the ci profile's model
    assert set(m["models"]) == {"base", "sft_lora", "dpo", "ppo"}
    assert steps["sft"]["lesson_cells_skipped"] == 1                                                         # the failing lesson cell was left out
    for f in ("metrics.json", "summary.md", "notebooks/03_sft.ipynb", "logs/sft.log", "steps/eval.json"):
        assert (run/f).is_file(), f
    assert json.loads((run/"metrics.json").read_text())["models"]["dpo"] == {"category_accuracy": 0.5}
    assert "| sft_lora |" in (run/"summary.md").read_text()
    assert any("[5/5] eval" in l and "done" in l for l in lines)

    with pytest.raises(FinetuneLabError, match="already holds a run"):
        pipeline.run_pipeline("ci", run, nbs=nbs, echo=lines.append)
    lines.clear()
    pipeline.run_pipeline("ci", run, params={"max_steps": 3, "sft.max_steps": 7, "data_path": str(nbs/"d.jsonl")}, resume=True, nbs=nbs, echo=lines.append)
    assert sum("finished earlier: skipped" in l for l in lines) == 5
    lines.clear()   # a changed parameter reruns the steps it reaches, and only them
    pipeline.run_pipeline("ci", run, params={"max_steps": 3, "sft.max_steps": 8, "data_path": str(nbs/"d.jsonl")}, resume=True, nbs=nbs, echo=lines.append)
    assert [l.split()[1] for l in lines if "done in" in l] == ["sft"]


def test_failure_is_one_line_and_keeps_earlier_work(nbs, tmp_path):
    run = tmp_path/"run"
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["run", "--profile", "ci", "--nbs", str(nbs), "--out", str(run), "-p", "data_path=no/such.jsonl"])
    msg = err.getvalue()
    assert code == 2 and msg.count("\n") == 1, msg
    assert "02_data.ipynb, cell 3" in msg and "no/such.jsonl: no such file" in msg and "FinetuneLabError" in msg
    assert (run/"notebooks"/"02_data.ipynb").is_file() and not (run/"steps"/"data.json").exists()


def test_a_bug_exits_1_and_full_profile_runs_lesson_cells(nbs, tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", "--profile", "full", "--nbs", str(nbs), "--out", str(tmp_path/"r"), "--only", "sft", "-p", f"data_path={nbs/'d.jsonl'}"])
    assert code == 1 and "03_sft.ipynb, cell 4" in err.getvalue() and "RuntimeError: a lesson-only cell ran" in err.getvalue()


@pytest.mark.parametrize("argv, expected", [
    (["-p", "max_stpes=3"], "no lesson notebook has a parameter 'max_stpes'"),
    (["-p", "sft.prefs_path=x"], "of step sft has a parameter 'prefs_path'"),
    (["-p", "nosep"], "is not KEY=VALUE"),
    (["--only", "dpo"], "starts from the sft model"),
    (["--only", "train"], "invalid choice: 'train'"),
])
def test_bad_arguments_are_refused_before_anything_runs(nbs, tmp_path, argv, expected):
    err = io.StringIO()
    with contextlib.redirect_stderr(err): code = main(["run", "--profile", "ci", "--nbs", str(nbs), "--out", str(tmp_path/"r"), *argv])
    assert code == 2 and expected in err.getvalue() and err.getvalue().count("\n") == 1
    assert not (tmp_path/"r"/"notebooks").exists()


def test_missing_notebooks_are_one_line(tmp_path):
    with pytest.raises(FinetuneLabError, match="no lesson notebooks"): pipeline.lesson_dir(tmp_path)


def test_real_lessons_declare_the_shared_names():
    d = pipeline.lesson_dir()
    for step, s in pipeline.STEPS.items():
        declared = pipeline.declared_parameters(d/s.notebook)
        assert {"model_name", "out_dir", "seed"} <= set(declared), step
        assert "data_path" in declared and str(declared["data_path"]).strip("\"'").endswith("tickets_raw.jsonl"), step  # data_path means the task data everywhere
    for prof in pipeline.PROFILES.values():   # every profile key names a real parameter of its step
        pipeline.check_overrides(prof["params"], {name: pipeline.declared_parameters(d/s.notebook) for name, s in pipeline.STEPS.items()})


def test_sft_method_is_wired_to_every_later_step(nbs, tmp_path):
    "`-p method=ia3` trains SFT into sft/ia3, and DPO, RLHF and the evaluation are handed that adapter, not sft/lora's."
    run = tmp_path/"run"
    m = pipeline.run_pipeline("ci", run, params={"method": "ia3", "data_path": str(nbs/"d.jsonl")}, nbs=nbs, echo=lambda s: None)
    want = str(run.resolve()/"sft"/"ia3"/"adapter")
    assert (run/"sft"/"ia3"/"adapter").is_dir() and not (run/"sft"/"lora").exists()
    assert {s: m["steps"][s]["measured"]["sft_adapter"] for s in ("dpo", "rlhf", "eval")} == {s: want for s in ("dpo", "rlhf", "eval")}
    again = pipeline.run_pipeline("ci", tmp_path/"run2", params={"sft.method": "prompt", "data_path": str(nbs/"d.jsonl")}, only=["data", "sft", "dpo"],
                                  nbs=nbs, echo=lambda s: None)
    assert again["steps"]["dpo"]["measured"]["sft_adapter"].endswith("sft/prompt/adapter")


def test_notebooks_test_at_the_ci_profile(monkeypatch):
    "The hidden IN_TEST cells read the ci profile: its plain keys, and the step's own keys, for the names a notebook declares."
    monkeypatch.setenv("IN_TEST", "1")
    got = pipeline.ci_parameters("dpo", ["model_name", "max_steps", "eval_rows", "beta"])
    ci = pipeline.PROFILES["ci"]["params"]
    assert got == {"model_name": ci["model_name"], "max_steps": ci["dpo.max_steps"], "eval_rows": ci["dpo.eval_rows"]}
    assert pipeline.ci_parameters(None, ["model_name", "max_steps"]) == {"model_name": ci["model_name"]}
    monkeypatch.delenv("IN_TEST")
    assert pipeline.ci_parameters("dpo", ["model_name"]) == {}


def test_every_lesson_reads_the_ci_profile_in_its_hidden_cell():
    "No lesson repeats the ci profile's numbers: each hidden IN_TEST cell calls ci_parameters."
    d = pipeline.lesson_dir()
    for s in pipeline.STEPS.values():
        nb = nbformat.read(str(d/s.notebook), as_version=4)
        i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        assert f'ci_parameters("{s.name}", globals())' in nb.cells[i + 1].source, s.notebook


def test_a_killed_run_resumes_and_skips_its_finished_steps(nbs, tmp_path):
    "`finetune-lab run` SIGKILLed during the dpo step (by that step's kernel, once), then `--resume`: data and sft are skipped, the rest runs."
    import subprocess, sys
    nb = nbformat.read(str(nbs/pipeline.STEPS["dpo"].notebook), as_version=4)
    marker = tmp_path/"killed-once"
    nb.cells.insert(2, nbformat.v4.new_code_cell(f'import os, signal\nfrom pathlib import Path\nif not Path({str(marker)!r}).exists():\n'
                                                 f'    Path({str(marker)!r}).touch(); os.kill(os.getppid(), signal.SIGKILL)   # the kernel kills the run that started it'))
    nbformat.write(nb, str(nbs/pipeline.STEPS["dpo"].notebook))
    run, argv = tmp_path/"run", ["run", "--profile", "ci", "--nbs", str(nbs), "-p", f"data_path={nbs/'d.jsonl'}"]
    kid = subprocess.run([sys.executable, "-c", f"from finetune_lab.cli import main; main({argv + ['--out', str(run)]!r})"], capture_output=True, text=True)
    assert kid.returncode == -9 and marker.exists(), kid.stderr
    assert (run/"steps"/"sft.json").is_file() and not (run/"steps"/"dpo.json").exists() and not (run/"metrics.json").exists()
    out = io.StringIO()
    with contextlib.redirect_stdout(out): assert main([*argv, "--out", str(run), "--resume"]) == 0
    lines = out.getvalue().splitlines()
    assert sum("finished earlier: skipped" in l for l in lines) == 2 and [l.split()[1] for l in lines if "done in" in l] == ["dpo", "rlhf", "eval"], lines
    assert set(json.loads((run/"metrics.json").read_text())["models"]) == {"base", "sft_lora", "dpo", "ppo"}
