"Cost (06e_cost): the memory estimator against hand counts, autograd's saved tensors and a measured run; 6·N·T against torch's FLOP counter; `finetune-lab cost`'s answers and bad input. Tiny models only, no network."
import json, math
from pathlib import Path
import pytest, torch

from finetune_lab import cost as C
from finetune_lab.core import FinetuneLabError
from finetune_lab.models import prepare_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT/"data"/"tickets_raw.jsonl"
SMOLLM2 = C.ModelShape(576, 30, 1536, 9, 3, 49152)   # the bundled model's config.json, by hand
MB = 2**20


def small_vocab_model():
    "A 2-block Llama with a 256-entry vocabulary: the blocks, not the log-softmax, dominate what autograd saves."
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, use_cache=False)
    return LlamaForCausalLM(cfg).train(), C.ModelShape(64, 2, 128, 4, 2, 256)


def test_full_fine_tuning_costs_16_bytes_per_parameter():
    for shape in (SMOLLM2, C.PUBLISHED_SHAPES["Llama-2-7B"]):
        for precision in ("fp32", "bf16"):           # fp32: 4 + 4 + 8; mixed: 2 + 2 + (4 master + 8)
            e = C.estimate_memory(shape, "full", precision, overhead_mb=0)
            assert math.isclose((e.weights + e.gradients + e.optimizer) * MB, 16 * shape.params)
    e = C.estimate_memory(SMOLLM2, "full", "fp32", overhead_mb=0)
    assert e.weights * MB == 4 * SMOLLM2.params and e.optimizer * MB == 8 * SMOLLM2.params


def test_parameter_counts_by_hand_and_from_config():
    assert SMOLLM2.params == 134_515_008                        # SmolLM2-135M's published count
    assert C.lora_params(SMOLLM2, 16) == 30 * 16 * (1152 + 768 + 768 + 1152 + 3 * 2112) == 4_884_480
    tiny = C.ModelShape.from_config(prepare_model("tiny"))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(prepare_model("tiny"))
    assert tiny.params == sum(p.numel() for p in model.parameters())
    from peft import LoraConfig, get_peft_model
    lora = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert C.lora_params(tiny, 8) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_published_shapes_for_a_parameter_count():
    assert C.ModelShape.from_params(7e9).name == "Llama-2-7B" and C.ModelShape.from_params(70e9).name == "Llama-2-70B"
    assert abs(C.PUBLISHED_SHAPES["Llama-2-70B"].params - 68.98e9) < 0.01e9
    s = C.ModelShape.from_params(30e9)                          # between published sizes: widths kept, layers scaled
    assert "layers" in s.name and abs(s.params / 30e9 - 1) < 0.03


def test_qlora_weights_are_4_bits_plus_block_scales():
    s = C.PUBLISHED_SHAPES["Llama-2-7B"]
    assert math.isclose(C.NF4_BYTES, 0.5 + 1 / 64 + 4 / (64 * 256))
    q, l = (C.estimate_memory(s, m, "bf16", overhead_mb=0) for m in ("qlora", "lora"))
    assert math.isclose(q.weights * MB - l.weights * MB, s.linear_params * (C.NF4_BYTES - 2))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_counted_activations_match_what_autograd_saves(method):
    model, shape = small_vocab_model()
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")).train()
    ids = torch.randint(0, 256, (2, 32))
    counted = C.activation_bytes(shape, method, "fp32", 2, 32) + 64 * 4 * shape.vocab     # + the loss's saved log-softmax
    assert abs(counted / C.autograd_saved_bytes(model, ids) - 1) < 0.01


def test_gradient_checkpointing_keeps_only_the_block_inputs():
    model, shape = small_vocab_model()
    model.activation_checkpointing_enable()
    ids = torch.randint(0, 256, (2, 32))
    # in the forward pass: each block's input, and the head's tensors; the recomputed block comes later, in the backward pass,
    # and the rotary cos and sin are held by the checkpoints themselves (alive, but not saved through autograd's hooks)
    head = C.head_saved_per_token(shape)
    counted = (C.activation_bytes(shape, "full", "fp32", 2, 32, True) - 64 * sum(C.saved_per_token(shape).values())
               - 32 * head["rotary cos, sin (per position)"] + 64 * head["log-softmax (fp32)"])
    assert abs(counted / C.autograd_saved_bytes(model, ids) - 1) < 0.02


def test_six_n_t_against_torchs_flop_counter():
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(prepare_model("tiny")).train()
    n, ids = sum(p.numel() for p in model.parameters()), torch.randint(0, 49152, (1, 64))
    assert C.train_flops(n, 64) == 6 * n * 64
    assert abs(sum(C.counted_flops(model, ids).values()) / C.train_flops(n, 64) - 1) < 0.01
    from peft import LoraConfig, get_peft_model
    lora = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    expected = C.train_flops(n, 64, "lora") + 6 * C.lora_params(C.ModelShape.from_config(prepare_model("tiny"))) * 64   # + the adapters
    assert abs(sum(C.counted_flops(lora, ids).values()) / expected - 1) < 0.01


def test_estimate_against_a_measured_run(tmp_path):
    # Every term of the estimate is an exact byte count (checked against autograd above); what the measurement adds is the
    # process's own memory beyond its imports (the loading machinery, autograd's and OpenMP's threads): about 20 MB on ~620 MB
    # for the tiny model with the mmap allocator, so 10% leaves room for other library versions and nothing for a wrong term
    # (the loss's tensors alone are 144 MB of it).
    ids = C.training_tokens("tiny", DATA, 4 * 64 * 2)
    r = C.measure_run("tiny", "full", False, ids, 4, 64, "mmap", tmp_path, seed=0)
    e = C.estimate_memory(C.ModelShape.from_config(prepare_model("tiny")), "full", "fp32", 4, 64, overhead_mb=r["imports_mb"])
    assert len(r["seconds"]) == 2 and r["high_water_mb"] >= r["peak_mb"] * 0.99
    assert abs(e.total / r["peak_mb"] - 1) < 0.10, (e.total, r)


def test_cost_money_and_fit():
    c = C.estimate_cost(7e9, 5e6, "lora", "h100")
    assert c.fits and c.gpus == 1 and c.currency == "GBP"
    assert math.isclose(c.hours, 6 * c.params * 5e6 / (989e12 * 0.35) / 3600)     # (4 + 2 recompute)·N·T at 35% of 989 TFLOP/s
    assert math.isclose(c.cost, c.hours * C.GPUS["h100"].on_demand)
    assert math.isclose(C.estimate_cost(7e9, 5e6, "lora", "h100", price_per_hour=4.0, epochs=3).cost, 3 * c.hours * 4.0)
    assert C.estimate_cost(7e9, 5e6, "lora", "h100", spot=True).cost < c.cost
    big = C.estimate_cost(70e9, 5e6, "full", "h100")
    assert big.fits and big.gpus == big.gpus_needed > 8 and big.memory_per_gpu_mb <= 80 * 1024
    assert not C.estimate_cost(70e9, 5e6, "full", "h100", gpus=2).fits


def test_run_cost_cli_text_and_json():
    text = C.run_cost_cli("7e9", "lora", "5e6", "h100")
    assert len(text.splitlines()) == 5 and "£" in text and "Llama-2-7B" in text
    r = json.loads(C.run_cost_cli("7B", "qlora", "5M", "a100-80gb", spot=True, json_out=True, utilisation=None, epochs=2))
    assert r["tokens"] == 1e7 and r["spot"] and r["currency"] == "GBP" and r["fits"]
    assert [C.parse_params(v) for v in ("7e9", "7B", "135M", "500k", 5e6)] == [7e9, 7e9, 135e6, 5e5, 5e6]


@pytest.mark.parametrize("args, says", [
    (("7e9", "lora", "5e6", "h200"), "unknown GPU 'h200'"),
    (("7e9", "dora", "5e6", "h100"), "unknown method 'dora'"),
    (("-7e9", "lora", "5e6", "h100"), "'-7e9' is not a positive count"),
    (("7e9", "lora", "0", "h100"), "'0' is not a positive count"),
    (("7e9", "lora", "nan", "h100"), "'nan' is not a positive count"),
    ((float("inf"), "lora", "5e6", "h100"), "not a positive number"),
    (("seven", "lora", "5e6", "h100"), "not a count")])
def test_cost_bad_input_is_one_line(args, says):
    with pytest.raises(FinetuneLabError) as e: C.run_cost_cli(*args)
    msg = str(e.value)
    assert says in msg and "Fix:" in msg and len(msg.splitlines()) == 1 and e.value.exit_code == 2
    if "GPU" in says: assert "h100" in msg and "cpu-2core" in msg                 # the known names, listed


def test_cost_bad_settings():
    with pytest.raises(FinetuneLabError, match="above 1"): C.estimate_cost(7e9, 5e6, utilisation=1.5)
    with pytest.raises(FinetuneLabError, match="GPU count"): C.estimate_cost(7e9, 5e6, gpus=0)
    with pytest.raises(FinetuneLabError, match="use one of fp32, bf16"): C.estimate_memory(SMOLLM2, precision="fp8", overhead_mb=0)


@pytest.mark.parametrize("args, says", [
    (["--params", "7e9", "--tokens", "5e6", "--gpu", "h200x"], "unknown GPU 'h200x'"),
    (["--params", "-7", "--tokens", "5e6"], "is not a positive count"),
    (["--params", "7e9", "--tokens", "5e6", "--method", "dora"], "dora"),
    (["--params", "7e9", "--tokens", "inf"], "inf"),
    (["--params", "7e9", "--tokens", "5e6", "--gpus", "0"], "0"),
    (["--tokens", "5e6"], "--params"),
])
def test_cli_cost_bad_input_exit_2_one_line(args, says):
    import subprocess, sys
    r = subprocess.run([str(Path(sys.executable).parent/"finetune-lab"), "cost", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_cli_cost_json():
    import subprocess, sys
    r = subprocess.run([str(Path(sys.executable).parent/"finetune-lab"), "cost", "--params", "7B", "--method", "qlora", "--tokens", "5M", "--gpu", "l4", "--spot", "--json"],
                       capture_output=True, text=True, timeout=120)
    d = json.loads(r.stdout)
    assert r.returncode == 0 and d["gpu"] == "l4" and d["currency"] == "GBP" and d["fits"] and d["gpus"] >= 1
