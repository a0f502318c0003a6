import subprocess, sys
from pathlib import Path
import pytest
from transformers import AutoModelForCausalLM

EXE = Path(sys.executable).parent/"finetune-lab"


def run(*args):
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=600)


def test_model_list():
    r = run("model", "list")
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m-instruct" in r.stdout and "tiny" in r.stdout


def test_model_prepare_prints_a_loadable_folder():
    r = run("model", "prepare")
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert len(r.stdout.strip().splitlines()) == 1 and (path/"config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(path).num_parameters() > 134e6


@pytest.mark.parametrize("args", [("model", "prepare", "gpt-17"), ("model", "prepare", "/no/such/dir")])
def test_bad_model_name_is_one_line_exit_2(args):
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.startswith("finetune-lab: error:") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_usage_errors_exit_2():
    assert run().returncode == 2
    assert run("model", "explode").returncode == 2


def test_generate_with_tiny():
    r = run("model", "generate", "hello", "there", "--model", "tiny", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") >= 2


def test_readme_is_generated_from_index():
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root/"tools"/"readme.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
