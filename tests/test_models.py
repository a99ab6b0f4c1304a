"""Sequence-classifier pooling (models.py): mean over the real tokens, chosen from the encoder's
own sentence-transformers config, and usable with the LoRA methods."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig

from fedtune.config import ConfigError, load_config
from fedtune.methods import lora
from fedtune.methods.base import trainable_parameters
from fedtune.models import _classifier_class, _mean_pooling_class, pooling_of, tiny_model

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
        load_config(None, ["model.pooling=max"])
    cfg = load_config(None, ["model.source=tiny", "model.tiny_hidden=32", "model.tiny_vocab=64",
                             "data.task=classification", "model.pooling=mean"])
    assert type(tiny_model(cfg)).__name__ == "MeanPoolingBertForSequenceClassification"
    cfg = load_config(None, ["model.source=tiny", "model.tiny_hidden=32", "model.tiny_vocab=64",
                             "data.task=classification"])
    assert type(tiny_model(cfg)).__name__ == "BertForSequenceClassification"


def test_mean_pooling_refuses_a_non_bert_encoder(tmp_path):
    from transformers import RobertaConfig

    RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BERT-family encoders only"):
        _classifier_class(tmp_path, "mean")
    assert _classifier_class(tmp_path, "auto").__name__ == "AutoModelForSequenceClassification"
