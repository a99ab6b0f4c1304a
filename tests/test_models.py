"""models.py: sequence-classifier pooling (mean over the real tokens, chosen from the encoder's
own sentence-transformers config, usable with the LoRA methods); the device and dtype a model
is placed in; models built from a config.json (the shipped Llama-3.2 shapes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM

from fedtune.config import ConfigError, load_config
from fedtune.methods import lora
from fedtune.methods.base import trainable_parameters
from fedtune.models import (
    _classifier_class,
    _mean_pooling_class,
    load_model,
    model_from_config,
    place,
    pooling_of,
    resolve_device,
    tiny_model,
)

from .conftest import BASE

VOCAB = 128


def tiny_mean_bert(seed: int = 0):
    torch.manual_seed(seed)
    conf = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    return _mean_pooling_class()(conf).eval()


def test_pooling_follows_the_encoders_own_config(tmp_path):
    assert pooling_of(None) == "cls"
    assert pooling_of(tmp_path) == "cls"  # no sentence-transformers config
    (tmp_path / "1_Pooling").mkdir()
    conf = tmp_path / "1_Pooling" / "config.json"
    conf.write_text(json.dumps({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    assert pooling_of(tmp_path) == "mean"
    assert pooling_of(tmp_path, "cls") == "cls"
    conf.write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert pooling_of(tmp_path) == "cls"
    assert pooling_of(None, "mean") == "mean"


def test_shipped_minilm_is_mean_pooled():
    from fedtune.models import ModelNotFoundError, minilm_folder

    try:
        folder = minilm_folder()
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    assert pooling_of(folder) == "mean"


def test_mean_pooling_is_the_mean_of_the_real_token_states():
    model = tiny_mean_bert()
    assert model.bert.pooler is None
    assert not any("pooler" in n for n, _ in model.named_parameters())
    x = torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        hidden = model.bert(input_ids=x).last_hidden_state
        by_hand = model.classifier(hidden.mean(1))
        # the same text padded to 12 tokens (mask 0 on the padding) gives the same logits
        padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], 1)
        mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], 1).long()
        logits_padded = model(input_ids=padded, attention_mask=mask).logits
        # counting the padding changes the answer: the mask is what excludes it
        logits_unmasked = model(input_ids=padded, attention_mask=torch.ones_like(padded)).logits
    assert torch.allclose(logits, by_hand, atol=1e-6)
    assert torch.allclose(logits_padded, logits, atol=1e-5)
    assert not torch.allclose(logits_unmasked, logits, atol=1e-3)


def test_loss_with_labels():
    model = tiny_mean_bert()
    x = torch.randint(2, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 1])
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x), labels=y)
    assert float(out.loss) == pytest.approx(
        float(torch.nn.functional.cross_entropy(out.logits, y)))


def test_federa_on_a_mean_pooled_encoder_keeps_the_output_and_sends_the_head():
    model = tiny_mean_bert()
    x = torch.randint(2, VOCAB, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[0, 6:] = 0
    with torch.no_grad():
        ref = model(input_ids=x, attention_mask=mask).logits.clone()
    pm = lora.prepare_model(model, lora.Config(rank=4), 0, init="svd")
    with torch.no_grad():
        out = pm(input_ids=x, attention_mask=mask).logits
    assert torch.allclose(out, ref, atol=1e-5)
    names = list(trainable_parameters(pm))
    assert sum("classifier.modules_to_save" in n for n in names) == 2
    assert all(".lora_" in n or "classifier" in n for n in names)


def test_pooling_config_is_validated_and_reaches_tiny_models():
    with pytest.raises(ConfigError, match="model.pooling: 'max' is not allowed"):
        load_config(BASE, ["model.pooling=max"])
    cfg = load_config(BASE, ["model.source=tiny", "model.tiny_hidden=32", "model.tiny_vocab=64",
                             "data.task=classification", "model.pooling=mean"])
    assert type(tiny_model(cfg.model, classifier=True, seed=0)).__name__ == (
        "MeanPoolingBertForSequenceClassification")
    cfg = load_config(BASE, ["model.source=tiny", "model.tiny_hidden=32", "model.tiny_vocab=64",
                             "data.task=classification"])
    assert type(tiny_model(cfg.model, classifier=True, seed=0)).__name__ == (
        "BertForSequenceClassification")


def test_mean_pooling_refuses_a_non_bert_encoder(tmp_path):
    from transformers import RobertaConfig

    RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BERT-family encoders only"):
        _classifier_class(tmp_path, "mean")
    assert _classifier_class(tmp_path, "auto").__name__ == "AutoModelForSequenceClassification"


# --- device, dtype and models built from a config.json ----------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _mcfg(device):
    return SimpleNamespace(device=device)


def test_resolve_device_on_a_machine_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(_mcfg("cpu")) == torch.device("cpu")
    assert resolve_device(_mcfg("auto")) == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=rf"model.device: {name} asked, but .*use "
                                              r"model.device=cpu or auto"):
            resolve_device(_mcfg(name))
    with pytest.raises(ConfigError, match="'gpu' is not a device"):
        resolve_device(_mcfg("gpu"))


def test_resolve_device_picks_and_checks_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device(_mcfg("auto")) == torch.device("cuda", 0)  # the first GPU
    assert resolve_device(_mcfg("cuda")) == torch.device("cuda", 1)  # the current one
    assert resolve_device(_mcfg("cuda:1")) == torch.device("cuda", 1)
    assert resolve_device(_mcfg("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"cuda:2 asked, but this machine has 2 GPU\(s\) "
                                          r"\(cuda:0 to cuda:1\)"):
        resolve_device(_mcfg("cuda:2"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without "
                                                     "a GPU")
def test_cli_refuses_a_missing_gpu_in_one_line_before_loading_anything():
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", "run", "model.device=cuda:0"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedtune: error: model.device: cuda:0 asked")


def test_place_casts_parameters_keeps_float32_buffers_and_ties():
    conf = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                       tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    place(model, torch.bfloat16, torch.device("cpu"))
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), ref[n].bfloat16()), n
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # RoPE frequencies rounded to bfloat16 would rotate late positions visibly wrong
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def _tiny_config_json(folder: Path, vocab: int, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    values = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "vocab_size": vocab, "tie_word_embeddings": True, "rope_theta": 500000.0, **extra}
    (folder / "config.json").write_text(json.dumps(values))
    return folder / "config.json"


def test_model_source_config_builds_the_architecture_seeded(jsonl_data, tmp_path):
    from fedtune.engines.inprocess import run
    from fedtune.models import load_tokenizer

    from .conftest import tiny_overrides

    tok = load_tokenizer(load_config(BASE, ["model.source=tiny"]).model, classifier=False)
    path = _tiny_config_json(tmp_path / "shape", vocab=len(tok))
    items = tiny_overrides(jsonl_data, tmp_path / "runs", **{
        "model.source": "config", "model.path": path.parent, "model.dtype": "bfloat16",
        "federation.rounds": 1, "eval.generate": False})
    cfg = load_config(BASE, items)
    # no tokenizer beside the config: SmolLM2's
    assert len(load_tokenizer(cfg.model, classifier=False)) == len(tok)
    model = load_model(cfg.model, classifier=False, seed=cfg.seed, tokenizer=tok)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.hidden_size == 16 and len(model.model.layers) == 2
    assert model.config.pad_token_id == tok.pad_token_id
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    again = load_model(cfg.model, classifier=False, seed=cfg.seed, tokenizer=tok)
    other = load_model(cfg.model, classifier=False, seed=1, tokenizer=tok)
    a, b, c = (torch.cat([p.detach().flatten().float() for p in m.parameters()])
               for m in (model, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = run(cfg, tmp_path / "run", progress=False)  # the engine runs it end to end
    assert math.isfinite(rows[-1]["eval_loss"]) and math.isfinite(rows[-1]["train_loss"])


def test_model_source_config_checks_the_vocabulary_and_the_file(tmp_path):
    from fedtune.models import load_tokenizer

    tok = load_tokenizer(load_config(BASE, ["model.source=tiny"]).model, classifier=False)
    small = _tiny_config_json(tmp_path / "small", vocab=100)
    cfg = load_config(BASE, ["model.source=config", f"model.path={small}"])
    with pytest.raises(ConfigError, match=f"vocab_size 100 is smaller than the tokenizer's "
                                          f"{len(tok)} tokens"):
        load_model(cfg.model, classifier=False, seed=0, tokenizer=tok)
    (tmp_path / "typeless.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="no model_type"):
        model_from_config(tmp_path / "typeless.json")


def test_a_tokenizer_beside_the_config_is_used(tmp_path):
    from fedtune.models import load_tokenizer

    tok = load_tokenizer(load_config(BASE, ["model.source=tiny"]).model, classifier=False)
    tok.save_pretrained(tmp_path / "own")
    _tiny_config_json(tmp_path / "own", vocab=len(tok))
    cfg = load_config(BASE, ["model.source=config", f"model.path={tmp_path / 'own'}"])
    assert Path(load_tokenizer(cfg.model, classifier=False).name_or_path) == tmp_path / "own"


@pytest.mark.parametrize("name, params, layers", [("llama-3.2-1b.json", 1_235_814_400, 16),
                                                  ("llama-3.2-3b.json", 3_212_749_824, 28)])
def test_shipped_llama_shapes_on_the_meta_device(name, params, layers):
    model = model_from_config(CONFIGS / name, dtype=torch.bfloat16, device="meta")
    assert sum(p.numel() for p in model.parameters()) == params  # Llama-3.2-1B: 1.24e9
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    c = model.config
    assert (len(model.model.layers), c.vocab_size, c.num_key_value_heads) == (layers, 128256, 8)
    assert c.rope_parameters["rope_type"] == "llama3" and c.rope_parameters["factor"] == 32.0
    assert {p.device.type for p in model.parameters()} == {"meta"}


@needs_cuda
def test_config_model_on_the_gpu_has_the_cpu_weights(tmp_path):
    path = _tiny_config_json(tmp_path, vocab=256)
    cpu = model_from_config(path, dtype=torch.bfloat16, seed=3)
    gpu = model_from_config(path, dtype=torch.bfloat16, seed=3, device="cuda")
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert q.device.type == "cuda" and torch.equal(p, q.cpu()), n
