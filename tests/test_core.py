import json
import pytest
import torch
from finetune_lab.core import FinetuneLabError, atomic_path, get_device, get_dtype, precision_kwargs, claim_dir, seed_everything, write_json


def test_error_is_one_line_with_fix():
    e = FinetuneLabError("file x.jsonl\nrow 3: bad", fix="do\nthis")
    assert str(e) == "file x.jsonl row 3: bad. Fix: do this"
    assert e.exit_code == 2


def test_cpu_device_and_precision(monkeypatch):
    assert get_device("cpu") == "cpu"
    assert get_dtype("cpu") == torch.float32
    monkeypatch.setenv("FINETUNE_LAB_PRECISION", "fp32")
    assert precision_kwargs("cpu") == dict(use_cpu=True, bf16=False, fp16=False)
    monkeypatch.setenv("FINETUNE_LAB_PRECISION", "bf16")
    assert precision_kwargs("cpu") == dict(use_cpu=True, bf16=True, fp16=False)


def test_cpu_precision_follows_the_measurement(monkeypatch):
    import finetune_lab.core as core
    monkeypatch.delenv("FINETUNE_LAB_PRECISION", raising=False)
    monkeypatch.setattr(core, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(core, "bf16_speedup", lambda: 1.2)      # native, but not clearly faster: fp32
    assert core.train_precision("cpu") == "fp32"
    monkeypatch.setattr(core, "bf16_speedup", lambda: 4.0)
    assert core.train_precision("cpu") == "bf16"
    monkeypatch.setattr(core, "cpu_bf16_native", lambda: False)  # emulated bf16 is never chosen
    assert core.train_precision("cpu") == "fp32"


def test_peft_base_is_stored_in_the_training_precision(monkeypatch):
    from finetune_lab.models import prepare_model
    from finetune_lab.train import TrainSettings, load_base
    path = prepare_model("tiny")
    monkeypatch.setenv("FINETUNE_LAB_PRECISION", "bf16")
    frozen, full = load_base(path, TrainSettings(device="cpu")), load_base(path, TrainSettings(device="cpu"), fp32=True)
    assert frozen.dtype == torch.bfloat16 and frozen.config._attn_implementation == "eager"
    assert full.dtype == torch.float32                              # weights that train keep fp32 master copies
    monkeypatch.setenv("FINETUNE_LAB_PRECISION", "fp32")
    assert load_base(path, TrainSettings(device="cpu")).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_without_gpu_is_a_user_error():
    with pytest.raises(FinetuneLabError, match="no CUDA GPU"): get_device("cuda")


def test_device_env_override(monkeypatch):
    monkeypatch.setenv("FINETUNE_LAB_DEVICE", "cpu")
    assert get_device() == "cpu"


def test_seed_repeats():
    seed_everything(3); a = torch.rand(4)
    seed_everything(3); b = torch.rand(4)
    assert torch.equal(a, b)


def test_claim_dir_refuses_to_mix_runs(tmp_path):
    r = claim_dir(tmp_path/"x")
    (r/"f").write_text("1")
    with pytest.raises(FinetuneLabError, match="already holds a run"): claim_dir(tmp_path/"x")
    assert claim_dir(tmp_path/"x", resume=True) == r and (r/"f").is_file()
    assert claim_dir(tmp_path/"x", overwrite=True) == r and not (r/"f").exists()


def test_atomic_folder_replace_and_failure(tmp_path):
    target = tmp_path/"model"
    with atomic_path(target) as t:
        t.mkdir(); (t/"a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as t:
            t.mkdir(); (t/"a").write_text("half")
            raise RuntimeError("killed")
    assert (target/"a").read_text() == "old"
    with atomic_path(target) as t:
        t.mkdir(); (t/"a").write_text("new")
    assert (target/"a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_write_json_roundtrip(tmp_path):
    p = write_json(tmp_path/"sub"/"m.json", {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
