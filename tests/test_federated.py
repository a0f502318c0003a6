"The federated lesson's pieces (03f_federated): client shards, the server's weighted average, starting a round from it."
import json
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file, save_file
from finetune_lab.federated import StartFrom, average_adapters, client_shards

def row(product, i):
    return {"i": i, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": json.dumps({"category": "billing", "product": product})}]}

def test_client_shards_keep_lines_together_and_deal_the_rest():
    rows = [row(p, i) for i, p in enumerate(["a", "b", "c", "none", "a", "none", "none", "x", "b", "none"])]
    shards = client_shards(rows, {"a": 0, "b": 1, "c": 2}, 3, seed=0)
    assert sorted(r["i"] for s in shards for r in s) == list(range(10))          # every row, once
    assert {json.loads(r["messages"][-1]["content"])["product"] for r in shards[0]} <= {"a", "none", "x"}
    assert [r["i"] for r in shards[0] if r["i"] in (0, 4)] == [0, 4] and all(r["i"] not in (0, 4) for s in shards[1:] for r in s)
    assert sorted(len(s) - {0: 2, 1: 2, 2: 1}[c] for c, s in enumerate(shards)) == [1, 2, 2]   # the 5 unowned rows dealt in turn
    assert client_shards(rows, {"a": 0, "b": 1, "c": 2}, 3, seed=0) == shards   # seeded

def adapter(folder, value, names=("w1", "w2")):
    folder.mkdir(parents=True)
    save_file({n: torch.full((2, 2), float(value)) for n in names}, str(folder/"adapter_model.safetensors"))
    (folder/"adapter_config.json").write_text('{"r": 2}'); (folder/"training_args.bin").write_bytes(b"pickle")
    return folder

def test_average_adapters_weights_by_rows(tmp_path):
    a, b = adapter(tmp_path/"a", 1.0), adapter(tmp_path/"b", 3.0)
    out = average_adapters([a, b], [1, 3], tmp_path/"server")
    mean = load_file(str(out/"adapter_model.safetensors"))
    assert set(mean) == {"w1", "w2"} and torch.allclose(mean["w1"], torch.full((2, 2), 2.5))
    assert (out/"adapter_config.json").read_text() == '{"r": 2}' and not (out/"training_args.bin").exists()
    with pytest.raises(ValueError, match="same weights"): average_adapters([a, adapter(tmp_path/"c", 1.0, ("w1",))], [1, 1], tmp_path/"bad")
    assert not (tmp_path/"bad").exists()

def test_start_from_loads_the_saved_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from finetune_lab.models import load_model
    model = get_peft_model(load_model("tiny")[0], LoraConfig(r=2, target_modules="all-linear"))
    saved = {k: torch.randn_like(v) for k, v in get_peft_model_state_dict(model).items()}
    (tmp_path/"a").mkdir(); save_file(saved, str(tmp_path/"a"/"adapter_model.safetensors"))
    StartFrom(tmp_path/"a").on_train_begin(None, None, None, model=model)
    now = get_peft_model_state_dict(model)
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    (tmp_path/"b").mkdir(); save_file({**saved, "base_model.model.nowhere.lora_A.weight": torch.zeros(1)}, str(tmp_path/"b"/"adapter_model.safetensors"))
    with pytest.raises(ValueError, match="no place for"): StartFrom(tmp_path/"b").on_train_begin(None, None, None, model=model)
