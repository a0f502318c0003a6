"Deployment (06b_deploy): merge, GGUF round trip, quantized save/reload, the response cache, the server and its load test, on the tiny model."
import json, multiprocessing, socket, subprocess, sys
from pathlib import Path
import pytest, torch

from finetune_lab import deploy as D
from finetune_lab.core import FinetuneLabError
from finetune_lab.data import load_rows

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent/"finetune-lab"
ROWS = [r for r in load_rows(ROOT/"data"/"tickets_raw.jsonl")[:40] if r["messages"][-1]["content"].startswith("{")][:6]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    "A 2-step tiny LoRA adapter (a random model: its answers are noise, but deterministic)."
    from finetune_lab.sft import SFTSettings, train_sft
    out = tmp_path_factory.mktemp("sft")
    return Path(train_sft("tiny", ROOT/"tests"/"fixtures"/"chat.jsonl", SFTSettings(max_steps=2, eval_steps=1, eval_rows=2), out/"lora", live_plot=False).output)


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory):
    return D.merge_to_folder(adapter, tmp_path_factory.mktemp("deploy")/"merged")


def test_merged_answers_as_the_adapter(adapter, merged):
    from peft import PeftModel
    from finetune_lab.evaluate import resolve_model
    from finetune_lab.models import load_model
    ref = resolve_model(adapter)
    base, tok = load_model(str(ref.base), "generate", dtype=torch.float32)
    with_adapter = D.answers(PeftModel.from_pretrained(base, str(adapter)).eval(), tok, ROWS, ref.drop_system)
    assert D.answers(*D._load_folder(merged), ROWS, ref.drop_system) == with_adapter
    assert (merged/"model.safetensors").is_file() and not (merged/"adapter_config.json").exists()
    assert resolve_model(merged).drop_system == ref.drop_system   # evaluation asks the merged folder as it asked the adapter


def test_gguf_round_trip(merged, tmp_path):
    model, tok = D._load_folder(merged)
    enc = tok(["My phone will not charge."], return_tensors="pt")
    with torch.no_grad(): want = model(**enc).logits
    for qtype, tol in (("F32", 1e-4), ("F16", 5e-2)):
        back, back_tok = D.load_gguf(D.export_gguf(merged, tmp_path/f"m-{qtype}.gguf", qtype))
        assert back_tok("My phone will not charge.")["input_ids"] == tok("My phone will not charge.")["input_ids"]
        with torch.no_grad(): assert (back(**enc).logits - want).abs().max().item() < tol, qtype
    q8 = D.export_gguf(merged, tmp_path/"m-q8.gguf", "Q8_0")
    assert q8.stat().st_size < (tmp_path/"m-F16.gguf").stat().st_size
    assert len(D.answers(*D.load_gguf(q8), ROWS[:2], True)) == 2
    with pytest.raises(FinetuneLabError, match="not one the export writes"): D.export_gguf(merged, tmp_path/"x.gguf", "Q2_K")


@pytest.mark.parametrize("method", ["torchao-int8", "bnb-8bit"])
def test_quantized_saves_and_reloads(merged, tmp_path, method):
    try: v = D.quantized(merged, method, tmp_path/method)
    except D.Skipped as e: pytest.skip(str(e))
    assert (tmp_path/method/"config.json").is_file() and "quantization_config" in json.loads((tmp_path/method/"config.json").read_text())
    model, tok = v.load()
    assert len(D.answers(model, tok, ROWS[:2], True)) == 2


def _writer(path, n, start):
    c = D.ResponseCache(path, "fp")
    for i in range(start, start + n):
        k = c.key([{"role": "user", "content": f"q{i}"}], {})
        c.put(k, {"i": i}); assert c.get(k) == {"i": i}


def test_cache_hits_misses_and_concurrent_processes(tmp_path):
    c = D.ResponseCache(tmp_path/"c.sqlite", "fp")
    k = c.key([{"role": "User", "content": " a  b "}], {"t": 0})
    assert c.get(k) is None and k == c.key([{"role": "user", "content": "a b"}], {"t": 0}) and k != c.key([{"role": "user", "content": "a b"}], {"t": 1})
    c.put(k, {"x": "é"}); assert c.get(k) == {"x": "é"} and (c.hits, c.misses) == (1, 1)
    procs = [multiprocessing.get_context("spawn").Process(target=_writer, args=(tmp_path/"c.sqlite", 40, 40 * i)) for i in range(4)]
    for p in procs: p.start()
    for p in procs: p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4 and len(c) == 161
    assert b"pickle" not in (tmp_path/"c.sqlite").read_bytes() and json.loads(c._db().execute("SELECT value FROM responses LIMIT 1").fetchone()[0])


@pytest.fixture(scope="module")
def server(merged):
    with D.Server(merged, max_tokens=16, max_request_bytes=4096) as s: yield s


def test_server_answers_the_openai_client_and_caches(server, merged):
    import httpx
    from openai import OpenAI
    assert httpx.get(f"{server.url}/health").status_code == 200
    msgs = [{"role": "user", "content": "My order never arrived."}]
    r = OpenAI(base_url=f"{server.url}/v1", api_key="x").chat.completions.create(model=server.folder.name, messages=msgs, max_tokens=8, temperature=0)
    assert r.model == merged.name and isinstance(r.choices[0].message.content, str)
    body = {"messages": msgs, "max_tokens": 8, "temperature": 0}
    hits = [httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).headers["x-cache"] for _ in range(2)]
    assert hits == ["hit", "hit"]   # the openai client's request was the same one


def test_server_streams_through_the_front_door(server, merged):
    from openai import OpenAI
    msgs = [{"role": "user", "content": "Where is my refund?"}]
    chunks = list(OpenAI(base_url=f"{server.url}/v1", api_key="x").chat.completions.create(model=server.folder.name, messages=msgs, max_tokens=8, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text                                  # token by token, not one reply
    whole = OpenAI(base_url=f"{server.url}/v1", api_key="x").chat.completions.create(model=server.folder.name, messages=msgs, max_tokens=8, temperature=0)
    assert text == whole.choices[0].message.content                   # the same greedy answer either way


def test_server_refuses_bad_requests_and_keeps_going(server):
    import httpx
    url = f"{server.url}/v1/chat/completions"
    assert httpx.post(url, content=b"{nope", timeout=30).status_code == 400
    assert httpx.post(url, json={"messages": [{"role": "user"}]}, timeout=30).status_code == 400
    assert httpx.post(url, json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 17}, timeout=30).status_code == 400
    assert httpx.post(url, content=b"x" * 5000, timeout=30).status_code == 413
    assert httpx.post(url, json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "temperature": 0}, timeout=120).status_code == 200


def test_soak_of_mixed_requests_leaves_the_server_healthy(server):
    "500 requests, 8 at a time, three in four of them bad in a different way: every bad one gets its 4xx and a JSON error, every good one 200, memory flat."
    import asyncio, httpx, psutil
    assert server.url.startswith("http://127.0.0.1:")   # loopback unless told otherwise
    url = f"{server.url}/v1/chat/completions"
    msg = lambda i: {"role": "user", "content": f"ticket {i}: my order {i * 7919 % 10007} has not arrived"}
    def body(i):   # (request body, status expected)
        kind = i % 4
        if kind == 0: return json.dumps({"messages": [msg(i)], "max_tokens": 2}).encode(), 200
        if kind == 1: return [b"{nope", b"x" * 5000, b'{"messages": []}', json.dumps({"messages": [msg(i)], "model": "gpt-4"}).encode()][i // 4 % 4], None
        if kind == 2: return json.dumps({"messages": [msg(i)] * 65}).encode(), 400
        return json.dumps({"messages": [msg(i)], "temperature": "hot", "max_tokens": 2}).encode(), 400
    async def soak(n, start):
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i):
                async with sem:
                    b, want = body(i); r = await client.post(url, content=b, headers={"content-type": "application/json"})
                    return want, r.status_code, r.json()
            return await asyncio.gather(*(one(i) for i in range(start, start + n)))
    backend = psutil.Process(server.proc.pid)
    warm = asyncio.run(soak(100, 0)); rss_warm = backend.memory_info().rss
    got = warm + asyncio.run(soak(400, 100)); rss_end = backend.memory_info().rss
    assert len(got) == 500 and not [s for _, s, _ in got if s >= 500]
    assert all(s == 200 for want, s, _ in got if want == 200) and sum(want == 200 for want, _, _ in got) == 125
    bad = [(s, j) for want, s, j in got if want != 200]
    assert all(400 <= s < 500 and j["error"]["message"] for s, j in bad) and {s for s, _ in bad} == {400, 404, 413}
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    assert rss_end < rss_warm * 1.10, (rss_warm, rss_end)   # 400 more requests: the model server's memory does not grow


def test_bounded_load_test(server):
    bodies = [{"messages": [{"role": "user", "content": f"ticket {i}"}], "max_tokens": 4} for i in range(6)]
    res = D.load_test(server.url, bodies, (1, 3), time_limit=120)
    assert [r["concurrency"] for r in res] == [1, 3] and all(r["ok"] == 6 and r["errors"] == 0 and r["p50_s"] <= r["p95_s"] for r in res)


def run(*args): return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=600)


def test_cli_export_and_serve_errors(adapter, tmp_path):
    r = run("export", str(adapter), "--out", str(tmp_path/"e"), "--gguf", "q8_0")
    assert r.returncode == 0, r.stderr
    assert (tmp_path/"e"/"merged"/"config.json").is_file() and (tmp_path/"e"/"model-q8_0.gguf").is_file()
    r = run("export", str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "neither a model folder" in r.stderr
    (tmp_path/"a").mkdir(); (tmp_path/"a"/"adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/no/such/base"}))
    r = run("serve", str(tmp_path/"a"), "--port", "0")
    assert r.returncode == 2 and "is not on this machine" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); s.listen()
        r = run("serve", str(adapter), "--port", str(s.getsockname()[1]))
    assert r.returncode == 2 and "in use" in r.stderr and len(r.stderr.strip().splitlines()) == 1
