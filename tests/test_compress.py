"Compression (06c_compress): the student cut from the teacher, distillation and SFT of it, magnitude and MLP-channel pruning, on the tiny model."
import json
from pathlib import Path
import pytest, torch

from finetune_lab import compress as C
from finetune_lab.core import FinetuneLabError
from finetune_lab.deploy import _load_folder

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT/"tests"/"fixtures"/"chat.jsonl"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    "The tiny model (2 layers) as a plain folder, as `deploy.merge_to_folder` writes it."
    from finetune_lab.deploy import merge_to_folder
    return merge_to_folder("tiny", tmp_path_factory.mktemp("compress")/"teacher")


def logits(folder, ids=((1, 5, 9, 200, 7),)):
    with torch.no_grad(): return _load_folder(folder)[0](torch.tensor(ids)).logits


def test_keep_layers_bounds():
    assert C.keep_layers(30, 2)[-1] == 29 and len(C.keep_layers(30, 2)) == 15
    for bad in (0, 31):
        with pytest.raises(FinetuneLabError, match="use a number from 1 to 30"): C.keep_layers(30, bad)


def test_shrink_keeps_the_chosen_layers(teacher, tmp_path):
    same = C.shrink(teacher, tmp_path/"same", every=1)
    assert torch.allclose(logits(same), logits(teacher), atol=1e-5)          # every layer kept: the same model
    student = C.shrink(teacher, tmp_path/"student", every=2)
    s, t = _load_folder(student)[0], _load_folder(teacher)[0]
    assert s.config.num_hidden_layers == 1
    assert torch.equal(s.model.layers[0].mlp.up_proj.weight, t.model.layers[1].mlp.up_proj.weight)   # the last layer, kept whole
    assert torch.equal(s.model.embed_tokens.weight, t.model.embed_tokens.weight)
    assert not torch.allclose(logits(student), logits(teacher), atol=1e-3)  # a layer fewer: a different model


@pytest.mark.parametrize("with_teacher", [True, False])
def test_train_student_saves_a_model_that_changed(teacher, tmp_path, with_teacher):
    student = C.shrink(teacher, tmp_path/"student", every=2)
    res = C.train_student(student, DATA, teacher if with_teacher else None, C.StudentSettings(max_steps=2, learning_rate=1e-3), tmp_path/"run", live_plot=False)
    assert res.steps == 2 and res.method == ("distilled" if with_teacher else "sft")
    assert res.trainable_params == res.total_params                           # every weight trains
    assert not torch.allclose(logits(res.output), logits(student))
    assert json.loads((tmp_path/"run"/"student_result.json").read_text())["steps"] == 2


def test_distillation_loss_is_the_teachers(teacher, tmp_path):
    "A student identical to its teacher starts at zero divergence; SFT's cross-entropy does not."
    same = C.shrink(teacher, tmp_path/"same", every=1)
    s = C.StudentSettings(max_steps=1, learning_rate=1e-12, logging_steps=1)
    loss = lambda t: next(h["loss"] for h in C.train_student(same, DATA, t, s, tmp_path/f"run-{t is None}", live_plot=False).log_history if "loss" in h)
    assert loss(teacher) < 1e-3 < loss(None)


def test_magnitude_prune_and_sparsity(teacher):
    m = C.magnitude_prune(_load_folder(teacher)[0], 0.5)
    assert abs(C.sparsity(m) - 0.5) < 0.01
    assert torch.equal(m.model.embed_tokens.weight, _load_folder(teacher)[0].model.embed_tokens.weight)   # only the decoder blocks' linear layers
    with pytest.raises(FinetuneLabError, match="from 0 up to"): C.magnitude_prune(m, -0.1)


def test_sparsity_sweep_rows(teacher):
    from finetune_lab.data import load_rows
    rows = load_rows(DATA)[:2]
    sweep = C.sparsity_sweep(teacher, rows, drop_system=True, amounts=(0.0, 0.6))
    assert [round(p["sparsity"], 1) for p in sweep] == [0.0, 0.6] and all(len(p["answers"]) == 2 and p["forward_ms"] > 0 for p in sweep)


@pytest.mark.parametrize("importance", C.PRUNE_IMPORTANCE)
def test_prune_mlp_saves_a_smaller_dense_model(teacher, tmp_path, importance):
    from finetune_lab.data import load_rows
    pruned = C.prune_mlp(teacher, tmp_path/"pruned", 0.25, importance, load_rows(DATA)[:4])
    m, t = _load_folder(pruned)[0], _load_folder(teacher)[0]
    assert m.config.intermediate_size == int(t.config.intermediate_size * 0.75) and m.config.hidden_size == t.config.hidden_size
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in t.parameters())
    assert logits(pruned).shape == logits(teacher).shape
    with pytest.raises(FinetuneLabError, match="between 0 and 1"): C.prune_mlp(teacher, tmp_path/"x", 0)
    with pytest.raises(FinetuneLabError, match="calibration rows"): C.prune_mlp(teacher, tmp_path/"x", 0.25, "taylor")
    with pytest.raises(FinetuneLabError, match="unknown importance"): C.prune_mlp(teacher, tmp_path/"x", 0.25, "random")
    assert not (tmp_path/"x").exists()


def test_taylor_pruning_keeps_the_channels_the_loss_needs(teacher, tmp_path):
    "On the rows it was calibrated on, Taylor pruning costs less loss than pruning by weight size (or at worst the same)."
    from finetune_lab.data import load_rows
    rows = load_rows(DATA)[:8]
    model, tok = _load_folder(teacher)
    loss = {imp: C.val_loss(_load_folder(C.prune_mlp(teacher, tmp_path/imp, 0.5, imp, rows))[0], tok, rows, True) for imp in C.PRUNE_IMPORTANCE}
    assert loss["taylor"] <= loss["magnitude"] + 1e-6 and C.val_loss(model, tok, rows, True) < 20
