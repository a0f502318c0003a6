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


HEAVY = ("torch", "transformers", "trl", "peft", "datasets")


@pytest.mark.parametrize("argv", [["--help"], ["model", "list"], ["run", "--profile", "huge"], ["data", "check", "--help"]])
def test_start_up_imports_nothing_heavy(argv):
    "`--help`, `model list`, the light verbs' help and their usage errors answer without torch or transformers (seconds to import)."
    code = ("import sys; from finetune_lab.cli import main; code = main(sys.argv[1:]); "
            f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; print('HEAVY', heavy); sys.exit(code)")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in r.stdout, r.stdout[-500:] + r.stderr[-500:]
    assert r.returncode == (2 if "huge" in argv else 0), r.stderr
    if "huge" in argv: assert r.stderr.count("\n") == 1 and "invalid choice: 'huge'" in r.stderr   # a usage error is one line too


def _help(*verb):
    "`finetune-lab VERB --help`'s text, whitespace folded; in this process (the entry point itself is tested above and in test_start_up_imports_nothing_heavy)."
    import contextlib, io
    from finetune_lab.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out): code = main([*verb, "--help"])
    assert code == 0, out.getvalue()[-500:]
    return " ".join(out.getvalue().split())


@pytest.mark.parametrize("verb, cls", [("sft", "finetune_lab.sft:SFTSettings"), ("dpo", "finetune_lab.prefs:DPOSettings"),
                                       ("reward", "finetune_lab.rlhf:RewardSettings"), ("ppo", "finetune_lab.rlhf:PPOSettings"),
                                       ("grpo", "finetune_lab.rlhf:GRPOSettings"), ("eval", "finetune_lab.evaluate:GenSettings"),
                                       ("data check", "finetune_lab.data:DataSettings")])
def test_flags_come_from_the_settings(verb, cls):
    "Every settings field is a flag whose help is the field's comment and whose default is the field's."
    import dataclasses, importlib
    from finetune_lab.core import field_help
    from finetune_lab.cli import VERBS, field_flag
    module, _, name = cls.partition(":")
    settings = getattr(importlib.import_module(module), name)
    text, v = _help(*verb.split()), next(v for v in VERBS if v.name == verb)
    for f, help in zip(dataclasses.fields(settings), field_help(settings).values()):
        flag = v.renames.get(f.name, "--" + f.name.replace("_", "-"))
        assert flag in text, (verb, flag)
        assert help and " ".join(help.split()) in text, (verb, f.name, help)
        assert f"default: {f.default}" in text or "default" in help, (verb, f.name)
        assert field_flag(f, help)[1]["dest"] == f.name


def test_the_same_word_means_the_same_thing():
    "--eval-rows is validation rows and --test-rows held-out test rows, in every verb that has them; --beta pulls toward the reference."
    for verb in ("sft", "dpo", "reward"): assert "--eval-rows EVAL_ROWS validation rows" in _help(verb)
    for verb in ("sft", "ppo", "grpo", "eval"): assert "--test-rows" in _help(verb)
    for verb in ("dpo", "ppo", "grpo"): assert "--beta BETA pull toward the reference" in _help(verb)
    assert "--kl " not in _help("ppo")
    from finetune_lab.cli import parser, settings_from
    from finetune_lab.rlhf import PPOSettings
    args = parser(["ppo"]).parse_args(["ppo", "--data", "d", "--beta", "0.2", "--lr", "1e-5", "--no-gradient-checkpointing"])
    assert settings_from(args, PPOSettings) == PPOSettings(beta=0.2, learning_rate=1e-5)
