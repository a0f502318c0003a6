"The committed notebooks' saved outputs are clean (tools/check_outputs.py), and the check catches what it should."
import importlib.util, json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_outputs", ROOT/"tools"/"check_outputs.py")
check = importlib.util.module_from_spec(spec); spec.loader.exec_module(check)


def test_committed_notebooks_have_clean_outputs():
    problems = [line for p in sorted((ROOT/"nbs").glob("*.ipynb")) for line in check.notebook_problems(p)]
    assert not problems, "\n".join(problems)


def test_check_finds_each_kind_of_problem(tmp_path):
    outs = [{"output_type": "stream", "name": "stdout", "text": ["saved to /root/runs/x\n"]},
            {"output_type": "stream", "name": "stderr", "text": ["x.py:3: FutureWarning: gradient_checkpointing is deprecated\n"]},
            {"output_type": "error", "ename": "ValueError", "evalue": "x", "traceback": ["Traceback (most recent call last)", "ValueError: x"]},
            {"output_type": "display_data", "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "a"}}, "metadata": {}},
            {"output_type": "stream", "name": "stderr", "text": [" 0%|          | 0/272 [00:00<?, ?it/s]"]},
            {"output_type": "display_data", "data": {"text/plain": ["<Figure size 640x480 with 1 Axes>"]}, "metadata": {}},
            {"output_type": "stream", "name": "stdout", "text": ["x" * (check.MAX_CHARS + 1)]},
            {"output_type": "display_data", "data": {"text/plain": ["<Figure size 640x480 with 1 Axes>"], "image/png": "iVBOR"}, "metadata": {}},
            {"output_type": "stream", "name": "stdout", "text": ["runs/sft/lora/adapter and ~/.cache/finetune_lab\n"]}]
    nb = {"cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": [o]} for o in outs], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path/"bad.ipynb").write_text(json.dumps(nb))
    found = check.notebook_problems(tmp_path/"bad.ipynb")
    kinds = ["absolute path", "warning", "traceback", "widget without a text fallback", "progress-bar stub", "figure saved as text", "long output"]
    for i, kind in enumerate(kinds): assert any(l.startswith(f"bad.ipynb, cell {i}: {kind}") for l in found), (kind, found)
    assert not [l for l in found if l.startswith(("bad.ipynb, cell 7:", "bad.ipynb, cell 8:"))]   # a PNG figure, relative paths: fine
    assert check.main([str(tmp_path/"bad.ipynb")]) == 1


def test_check_flags_log_lines_on_stderr():
    out = {"output_type": "stream", "name": "stderr", "text": ["[transformers] There were missing keys in the checkpoint model loaded.\n"]}
    assert check.output_problems(out) == ["stderr output (a log line or a warning)"]
    assert check.output_problems({**out, "name": "stdout"}) == []
