"`finetune-lab bench` on the tiny model (every key of its JSON), and its table's verdicts on known numbers."
import json, subprocess, sys
from pathlib import Path
from finetune_lab.bench import bench_table

EXE = Path(sys.executable).parent/"finetune-lab"
KEYS = {"sft_tokens_per_s", "trl_default_tokens_per_s", "speedup_vs_trl", "fraction_of_matmul_peak", "time_to_quality_s", "trl_time_to_quality_s",
        "gen_tokens_per_s", "peak_mem_full_mb", "peak_mem_lora_mb", "dtype", "cpu_bf16_native"}


def test_bench_json_on_the_tiny_model(tmp_path):
    r = subprocess.run([str(EXE), "bench", "--model", "tiny", "--steps", "1", "--warmup", "1", "--gen-rows", "2", "--json", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert KEYS <= set(res)
    assert res["sft_tokens_per_s"] > 0 and res["trl_default_tokens_per_s"] > 0 and res["gen_tokens_per_s"] > 0
    assert res["speedup_vs_trl"] == round(res["sft_tokens_per_s"] / res["trl_default_tokens_per_s"], 2)
    assert res["peak_mem_full_mb"] > 0 and res["peak_mem_lora_mb"] > 0 and 0 < res["fraction_of_matmul_peak"]
    assert res["time_to_quality_s"] is None and res["quality"] is None          # not asked for
    assert res["training"]["trl_default"]["gradient_checkpointing"] is True      # TRL's default, kept
    assert json.loads((tmp_path/"bench.json").read_text()) == res


def test_bench_refuses_a_missing_adapter(tmp_path):
    r = subprocess.run([str(EXE), "bench", "--adapter", str(tmp_path/"nope")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "adapter" in r.stderr


def known(**kw):
    res = {"dtype": "bf16", "cpu_bf16_native": True, "matmul_peak_gflops": 900.0, "sft_tokens_per_s": 400.0, "trl_default_tokens_per_s": 100.0,
           "speedup_vs_trl": 4.0, "fraction_of_matmul_peak": 0.24, "time_to_quality_s": None, "trl_time_to_quality_s": None, "quality": None,
           "gen_tokens_per_s": 150.0, "peak_mem_full_mb": 3000.0, "peak_mem_lora_mb": 2500.0}
    return {**res, **kw}


def test_bench_table_verdicts():
    t = bench_table(known())
    assert "| speedup over TRL's defaults | 4.0 | ≥ 2 | met |" in t
    assert "| fraction of the matrix-product limit | 0.24 | ≥ 0.6 | not met |" in t
    assert "not run (--quality)" in t
    q = bench_table(known(quality={"bar": {}}, time_to_quality_s=300.0, trl_time_to_quality_s=None))
    assert "not reached in 3× the lab's time | ≥ 2× the lab's | met |" in q
    assert "| 500.0 | ≥ 2× the lab's | not met |" in bench_table(known(quality={"bar": {}}, time_to_quality_s=300.0, trl_time_to_quality_s=500.0))
