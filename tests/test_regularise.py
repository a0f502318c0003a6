"The regularisation lesson's helpers (03d_regularise): how much weight decay can shrink a weight, and the forgetting probe's paragraphs."
from pathlib import Path
import pytest
from finetune_lab.metrics import probe_texts
from finetune_lab.regularise import decay_left

DATA = Path(__file__).parent.parent/"data"

def test_decay_left():
    assert decay_left(1e-3, 0.0, 500) == 1.0
    assert decay_left(1e-3, 1.0, 60) == pytest.approx(0.999 ** 60)
    assert decay_left(1e-3, 0.1, 60) > 0.99 > decay_left(1e-3, 1.0, 60) > 0.9     # the usual 0.1 barely moves a weight in a short run

def test_probe_texts(tmp_path):
    f = tmp_path/"p.txt"; f.write_text("one para\nstill one\n\n\n  two  \n\n", encoding="utf-8")
    assert probe_texts(f) == ["one para\nstill one", "two"]
    probe = probe_texts(DATA/"general_probe.txt")
    assert len(probe) >= 5 and all(len(p) > 100 for p in probe)
