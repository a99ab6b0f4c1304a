"""FedIT and FeDeRA (methods/lora.py) on tiny Llama and BERT models, halves driven directly."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from fedtune import wire
from fedtune.config import ConfigError, TrainConfig, build, load_config
from fedtune.methods import lora
from fedtune.methods.base import FitContext, Upload, trainable_parameters, trainable_state
from fedtune.methods.registry import get_method
from fedtune.tasks import IGNORE, CausalLMTask, ClassificationTask, ClientData

from .conftest import BASE

VOCAB = 128


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden)
    return LlamaForCausalLM(conf).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    conf = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(conf).eval()


def prepared(name: str, model: torch.nn.Module, seed: int = 0, **options):
    spec = get_method(name)
    cfg = build(spec.config_cls, {"rank": 4, **options})
    return spec, cfg, spec.prepare_model(model, cfg, seed)


def lm_data(seed: int, n: int = 8) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    exs = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (10,), generator=g).tolist()
        exs.append({"input_ids": ids, "labels": [IGNORE] * 4 + ids[4:]})
    return ClientData(exs)


def cls_data(seed: int, n: int = 8) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    return ClientData([{"input_ids": torch.randint(2, VOCAB, (9,), generator=g).tolist(),
                        "label": i % 2} for i in range(n)])


LM_TASK = CausalLMTask(SimpleNamespace(pad_token_id=0, eos_token_id=1))
CLS_TASK = ClassificationTask(SimpleNamespace(pad_token_id=0), num_labels=2)


def ctx(round_: int, client: int, task) -> FitContext:
    train = TrainConfig(optimizer="sgd", lr=0.5, local_steps=2, batch_size=4)
    return FitContext(round=round_, client_id=client, seed=100 * round_ + client, train=train,
                      task=task)


def frozen_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


# --- registry and config ----------------------------------------------------------------------


def test_registered_with_wire_ids_and_config_validated():
    assert get_method("fedit").method_id == 6
    assert get_method("federa").method_id == 7
    assert get_method("federa").prepare_model is not None
    with pytest.raises(ConfigError, match="rank"):
        build(lora.Config, {"rank": 0}, prefix="method")
    with pytest.raises(ConfigError, match="dropout"):
        build(lora.Config, {"dropout": 1.5}, prefix="method")
    cfg = build(lora.Config, {"target_modules": ["q_proj", "k_proj"], "alpha": 8})
    assert cfg.target_modules == ["q_proj", "k_proj"] and cfg.alpha == 8.0
    exp = load_config(BASE, ["method.name=federa", "method.rank=4", "model.source=tiny",
                             "method.target_modules=[query, value]", "data.task=classification"])
    assert exp.method_config() == lora.Config(rank=4, target_modules=["query", "value"])


# --- initialisation ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedit", "federa"])
def test_output_unchanged_at_initialisation_causal(name):
    model = tiny_llama()
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=x).logits.clone()
    _, _, pm = prepared(name, model)
    with torch.no_grad():
        out = pm(input_ids=x).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()


def test_federa_output_unchanged_at_initialisation_encoder():
    model = tiny_bert()
    x = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.bert(input_ids=x).last_hidden_state.clone()
        ref_logits = model(input_ids=x).logits.clone()
    _, _, pm = prepared("federa", model)
    with torch.no_grad():
        hidden = pm.base_model.model.bert(input_ids=x).last_hidden_state
        logits = pm(input_ids=x).logits
    assert torch.allclose(hidden, ref, atol=1e-5, rtol=0)
    assert torch.allclose(logits, ref_logits, atol=1e-6, rtol=0)


def test_federa_adapters_are_the_top_singular_directions():
    model = tiny_llama()
    w0 = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    _, cfg, pm = prepared("federa", model, alpha=8.0)
    layer = dict(lora.lora_layers(pm))["base_model.model.model.layers.1.self_attn.q_proj"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = cfg.alpha / cfg.rank
    res = layer.get_base_layer().weight
    # B A s is the best rank-r approximation of W, the residual holds the rest of the spectrum
    u, sv, vh = torch.linalg.svd(w0.double())
    best = (u[:, :4] * sv[:4]) @ vh[:4]
    assert torch.allclose((s * b @ a).double(), best, atol=1e-5)
    assert torch.allclose((res + s * b @ a), w0, atol=1e-6)
    assert torch.allclose(torch.linalg.svdvals(res.double())[:28], sv[4:], atol=1e-5)
    # A A^T = diag(S_r / s): the factors split the singular values evenly
    assert torch.allclose((a @ a.T).double(), torch.diag(sv[:4] / s), atol=1e-5)
    assert not torch.equal(res, w0)


def test_federa_on_a_bfloat16_model_is_the_float64_cpu_svd_rounded_once():
    """The SVD and residual are computed on the CPU in float64 from the bfloat16 weight, then
    rounded once: the residual is bfloat16, the adapters float32 (peft's autocast), and the
    adapted model's output at the start is the bfloat16 model's up to bfloat16 rounding."""
    from fedtune.models import place

    model = place(tiny_llama(), torch.bfloat16, torch.device("cpu"))
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=x).logits.float()
    _, cfg, pm = prepared("federa", model)
    layer = dict(lora.lora_layers(pm))["base_model.model.model.layers.0.self_attn.q_proj"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    res = layer.get_base_layer().weight
    assert (res.dtype, a.dtype, b.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    s = cfg.alpha / cfg.rank
    u, sv, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    root = (sv[:4] / s).sqrt()
    b64, a64 = u[:, :4] * root, root[:, None] * vh[:4]
    assert torch.equal(res, (w0.double() - s * (b64 @ a64)).bfloat16())
    assert torch.equal(a, a64.float()) and torch.equal(b, b64.float())
    with torch.no_grad():
        out = pm(input_ids=x).logits.float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_lora_clients_of_different_dtypes_are_refused_by_name():
    """A bfloat16 base and a float32 base are different bases (their digests cover the bytes
    and the dtype): the server refuses to average adapters across them and says what to align."""
    from fedtune.models import place

    spec, cfg, pm32 = prepared("fedit", tiny_llama())
    pm16 = prepared("fedit", place(tiny_llama(), torch.bfloat16, torch.device("cpu")))[2]
    server = spec.make_server(cfg, trainable_state(pm32), 0, "examples")
    c32, c16 = spec.make_client(cfg, pm32, 0), spec.make_client(cfg, pm16, 0)
    down = server.download(0, None)
    ups = [Upload(0, 8, c32.fit(down, lm_data(0), ctx(0, 0, LM_TASK))),
           Upload(1, 8, c16.fit(down, lm_data(1), ctx(0, 1, LM_TASK)))]
    with pytest.raises(wire.MessageError, match=r"client 1: frozen base weights differ.*"
                                                r"model\.dtype"):
        server.aggregate(0, ups)
    assert server.round == 0


def test_fedit_init_is_peft_lora_seeded_by_run_seed():
    _, _, p1 = prepared("fedit", tiny_llama())
    _, _, p2 = prepared("fedit", tiny_llama())
    _, _, p3 = prepared("fedit", tiny_llama(), seed=1)
    s1, s2, s3 = (trainable_state(p) for p in (p1, p2, p3))
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    a_names = [n for n in s1 if ".lora_A." in n]
    b_names = [n for n in s1 if ".lora_B." in n]
    assert len(a_names) == len(b_names) == 4  # q and v in each of 2 layers
    assert all(not torch.equal(s1[n], s3[n]) for n in a_names)
    assert all(torch.count_nonzero(s1[n]) == 0 for n in b_names)
    # the global RNG is left alone
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    prepared("fedit", tiny_llama(seed=9))
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), expected)


def test_trainable_tensors_are_adapters_and_classification_head():
    model = tiny_bert()
    total = sum(p.numel() for p in model.parameters())
    _, _, pm = prepared("federa", model)
    names = list(trainable_parameters(pm))
    head = [n for n in names if "classifier" in n]
    assert head == ["base_model.model.classifier.modules_to_save.default.weight",
                    "base_model.model.classifier.modules_to_save.default.bias"]
    assert all(".lora_A." in n or ".lora_B." in n for n in names if n not in head)
    assert any(".query." in n for n in names) and any(".value." in n for n in names)
    n_train = sum(p.numel() for p in trainable_parameters(pm).values())
    # 2 layers x (query + value) x r (32 + 32) + head (2 x 32 + 2)
    assert n_train == 2 * 2 * 4 * 64 + 66
    assert n_train < 0.05 * total


def test_custom_targets_and_unknown_target_rejected():
    _, _, pm = prepared("fedit", tiny_llama(), target_modules=["q_proj", "k_proj", "o_proj"])
    names = [n for n, _ in lora.lora_layers(pm)]
    assert len(names) == 6 and not any(n.endswith("v_proj") for n in names)
    with pytest.raises(ValueError, match="nonexistent_proj"):
        prepared("federa", tiny_llama(), target_modules=["nonexistent_proj"])


RESIDUAL_SCRIPT = textwrap.dedent("""
    import hashlib, sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    from transformers import LlamaConfig, LlamaForCausalLM
    from fedtune.methods.registry import get_method
    from fedtune.config import build
    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=64, hidden_size=512, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    spec = get_method("federa")
    model = spec.prepare_model(LlamaForCausalLM(conf), build(spec.config_cls, {"rank": 8}), 3)
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode()); h.update(p.detach().contiguous().numpy().tobytes())
    print(torch.get_num_threads(), h.hexdigest())
""")


def test_federa_residual_bit_identical_across_processes_and_thread_counts():
    """Two processes with different thread counts build the same FeDeRA model, byte for byte
    (512 x 512 weights: there MKL's SVD otherwise changes with the thread count)."""
    env = {**os.environ, "OMP_NUM_THREADS": "4", "HF_HUB_OFFLINE": "1"}
    out = [subprocess.run([sys.executable, "-c", RESIDUAL_SCRIPT, str(t)], env=env, check=True,
                          capture_output=True, text=True, timeout=120).stdout.split()
           for t in (1, 3)]
    assert [o[0] for o in out] == ["1", "3"]
    assert out[0][1] == out[1][1]


# --- one federated round -----------------------------------------------------------------------


def run_round(name, make_model, data_fn, task, weighting="examples", sizes=(8, 4, 12)):
    spec, cfg, pm = prepared(name, make_model())
    server = spec.make_server(cfg, trainable_state(pm), 0, weighting)
    client = spec.make_client(cfg, pm, 0)
    frozen = frozen_state(pm)
    down = server.download(0, None)
    uploads = []
    for cid, n in enumerate(sizes):
        payload = client.fit(down, data_fn(cid, n), ctx(0, cid, task))
        uploads.append(Upload(cid, n, payload))
    return SimpleNamespace(spec=spec, cfg=cfg, pm=pm, server=server, client=client,
                           frozen=frozen, uploads=uploads)


def decoded(server, payload):
    return server.decode(payload, 0)


@pytest.mark.parametrize("name", ["fedit", "federa"])
def test_round_averages_adapters_weighted_by_examples(name):
    r = run_round(name, tiny_llama, lm_data, LM_TASK)
    pm, server, client, frozen, uploads = r.pm, r.server, r.client, r.frozen, r.uploads
    before = {n: t.clone() for n, t in server.weights.items()}
    tensors = [decoded(server, u.payload) for u in uploads]
    server.aggregate(0, uploads)
    assert server.round == 1
    total = sum(u.num_examples for u in uploads)
    for n in server.weights:
        expect = sum(u.num_examples / total * t[n] for u, t in zip(uploads, tensors))
        assert torch.allclose(server.weights[n], expect, atol=1e-7)
    # training moved the adapters (B too, from zero for FedIT) and nothing frozen
    assert any(not torch.equal(server.weights[n], before[n]) for n in before if ".lora_B." in n)
    after = frozen_state(pm)
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    # the client can load the new global adapters
    client.sync(server.download(1, 0))
    assert all(torch.equal(p.detach(), server.weights[n])
               for n, p in trainable_parameters(pm).items())


def test_upload_size_is_digest_plus_named_adapters_and_head():
    r = run_round("federa", tiny_bert, cls_data, CLS_TASK, weighting="equal")
    spec, cfg, pm, server, uploads = r.spec, r.cfg, r.pm, r.server, r.uploads
    params = trainable_parameters(pm)
    body = sum(2 + len(n.encode()) + 2 + 4 * p.dim() + 4 * p.numel() for n, p in params.items())
    assert len(uploads[0].payload) == wire.HEADER_SIZE + lora.DIGEST_SIZE + 4 + body
    assert len(server.download(0, None)) == wire.HEADER_SIZE + 4 + body
    names = list(decoded(server, uploads[0].payload))
    assert "base_model.model.classifier.modules_to_save.default.weight" in names
    server.aggregate(0, uploads)
    assert server.base_digest == lora.base_digest(pm)
    # equal weighting: plain mean
    server2 = spec.make_server(cfg, trainable_state(pm), 0, "equal")
    assert server2.weighting == "equal"


def _repack(payload: bytes, method_id: int, round_: int, edit) -> bytes:
    """Re-encode an upload after ``edit(tensors)`` changes its tensors."""
    _, body = wire.unframe(payload, method_id=method_id, kind=wire.UP)
    digest, rest = bytes(body[: lora.DIGEST_SIZE]), body[lora.DIGEST_SIZE:]
    tensors = wire.unpack_tensors(wire.Reader(rest))
    edit(tensors)
    return wire.frame(method_id, wire.UP, round_, digest + wire.pack_tensors(tensors))


def _wrong_shape(t):
    n = next(n for n in t if ".lora_A." in n)
    t[n] = torch.zeros(t[n].shape[0] + 1, t[n].shape[1])


def _missing(t):
    del t[next(n for n in t if ".v_proj." in n)]


def _nan(t):
    n = next(n for n in t if ".lora_B." in n)
    t[n] = t[n].clone()
    t[n][0, 0] = math.nan


def _extra(t):
    t["base_model.model.lm_head.weight"] = torch.zeros(2, 2)


@pytest.mark.parametrize("edit,message", [
    (_wrong_shape, "has shape"), (_missing, "missing 1 tensors"), (_nan, "NaN"),
    (_extra, "unexpected tensor"),
])
def test_bad_upload_rejected_and_server_untouched(edit, message):
    r = run_round("federa", tiny_llama, lm_data, LM_TASK)
    server, client, uploads = r.server, r.client, r.uploads
    server.aggregate(0, uploads)  # pins the digest; now at round 1
    state = {n: t.clone() for n, t in server.weights.items()}
    digest = server.base_digest
    fresh = [Upload(c, n, client.fit(server.download(1, 0), lm_data(c, n), ctx(1, c, LM_TASK)))
             for c, n in enumerate((8, 4, 12))]
    bad = Upload(2, 12, _repack(fresh[2].payload, 7, 1, edit))
    with pytest.raises(wire.MessageError, match=f"client 2: .*{message}"):
        server.aggregate(1, [fresh[0], fresh[1], bad])
    assert server.round == 1 and server.base_digest == digest
    assert all(torch.equal(server.weights[n], state[n]) for n in state)
    server.aggregate(1, fresh)  # the good uploads are still accepted
    assert server.round == 2


def test_upload_for_the_other_method_or_truncated_is_rejected():
    r = run_round("federa", tiny_llama, lm_data, LM_TASK)
    server, uploads = r.server, r.uploads
    p = uploads[0].payload
    fedit_msg = wire.frame(6, wire.UP, 0, p[12:])
    with pytest.raises(wire.MessageError, match="method id 6, expected 7"):
        server.aggregate(0, [Upload(0, 8, fedit_msg)])
    short = wire.frame(7, wire.UP, 0, p[12:40])
    with pytest.raises(wire.MessageError, match="client 0: message truncated"):
        server.aggregate(0, [Upload(0, 8, short)])
    assert server.round == 0 and server.base_digest is None


def test_client_on_a_different_residual_is_rejected():
    r = run_round("federa", tiny_llama, lm_data, LM_TASK)
    spec, cfg, server, client, uploads = r.spec, r.cfg, r.server, r.client, r.uploads
    other = spec.make_client(cfg, prepared("federa", tiny_llama(seed=1))[2], 0)
    assert other.digest != client.digest
    odd = Upload(3, 8, other.fit(server.download(0, None), lm_data(3), ctx(0, 3, LM_TASK)))
    with pytest.raises(wire.MessageError, match="client 3: frozen base weights differ"):
        server.aggregate(0, [*uploads, odd])
    assert server.round == 0 and server.base_digest is None
    server.aggregate(0, uploads)
    with pytest.raises(wire.MessageError, match="frozen base weights differ"):
        server.aggregate(1, [Upload(3, 8, other.fit(server.download(1, None), lm_data(3),
                                                     ctx(1, 3, LM_TASK)))])


def test_bad_download_leaves_client_model_untouched():
    r = run_round("fedit", tiny_llama, lm_data, LM_TASK)
    pm, server, client = r.pm, r.server, r.client
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    down = server.download(0, None)
    _, body = wire.unframe(down, method_id=6, kind=wire.DOWN)
    tensors = wire.unpack_tensors(wire.Reader(body))
    last = list(tensors)[-1]
    tensors[last] = tensors[last].clone()
    tensors[last][0, 0] = math.inf
    with pytest.raises(wire.MessageError, match="NaN or infinite"):
        client.sync(wire.frame(6, wire.DOWN, 0, wire.pack_tensors(tensors)))
    assert all(torch.equal(p.detach(), before[n]) for n, p in pm.named_parameters())


def test_server_state_dict_round_trip():
    r = run_round("federa", tiny_bert, cls_data, CLS_TASK)
    spec, cfg, server, uploads = r.spec, r.cfg, r.server, r.uploads
    server.aggregate(0, uploads)
    other = spec.make_server(cfg, trainable_state(prepared("federa", tiny_bert())[2]), 0,
                             "examples")
    other.load_state_dict(server.state_dict())
    assert other.round == 1 and other.base_digest == server.base_digest
    assert other.download(1, 0) == server.download(1, 0)


def test_digest_is_of_the_frozen_base():
    _, _, pm = prepared("federa", tiny_llama())
    d = lora.base_digest(pm)
    assert len(d) == lora.DIGEST_SIZE and d == lora.base_digest(pm)
    layer = next(iter(lora.lora_layers(pm)))[1]
    with torch.no_grad():
        layer.lora_A["default"].weight.add_(1.0)  # trainable: not part of the digest
    assert lora.base_digest(pm) == d
    with torch.no_grad():
        layer.get_base_layer().weight[0, 0] += 1e-3
    assert lora.base_digest(pm) != d
    # the same build gives the same digest in another instance; another base does not
    assert lora.base_digest(prepared("federa", tiny_llama())[2]) == d
    assert lora.base_digest(prepared("federa", tiny_llama(seed=1))[2]) != d


# --- through the in-process engine -------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedit", "federa"])
def test_engine_run_on_tiny_causal_lm(name, jsonl_data, tmp_path):
    from fedtune.config import load_config
    from fedtune.engines.inprocess import run

    from .conftest import tiny_overrides

    base = tiny_overrides(jsonl_data, tmp_path / "runs", **{"eval.generate": False,
                                                            "train.lr": 0.01})
    rows = run(load_config(BASE, [*base, f"method.name={name}", "method.rank=4"]),
               tmp_path / name, progress=False)
    ref = run(load_config(BASE, [*base, "federation.rounds=1"]), tmp_path / "fedavg",
              progress=False)
    # the adapters leave the pretrained model's output unchanged at round 0
    assert rows[0]["eval_loss"] == pytest.approx(ref[0]["eval_loss"], abs=1e-5)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    # adapters only: 2 layers x (q 32x32 + v 16x32) at rank 4, float32, far below the model
    assert rows[1]["bytes_up_per_client"] < ref[1]["bytes_up_per_client"] / 50
    assert rows[1]["bytes_up_per_client"] > 4 * 2 * 4 * (64 + 48)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_engine_run_on_tiny_classifier_sends_the_head(pooling, tmp_path):
    from fedtune.config import load_config
    from fedtune.engines.inprocess import run

    from .conftest import TEST_DEVICE

    overrides = {"model.source": "tiny", "model.device": TEST_DEVICE, "model.tiny_hidden": 32,
                 "data.source": "rotten_tomatoes",
                 "data.task": "classification", "data.max_length": 32, "data.max_examples": 160,
                 "partition.scheme": "dirichlet", "partition.num_clients": 4,
                 "partition.alpha": 0.5, "federation.rounds": 2, "train.local_steps": 2,
                 "train.batch_size": 8, "train.lr": 0.01, "train.optimizer": "adamw",
                 "eval.max_examples": 32, "output.dir": str(tmp_path / "runs"),
                 "method.name": "federa", "method.rank": 4, "model.pooling": pooling}
    cfg = load_config(BASE, [f"{k}={v}" for k, v in overrides.items()])
    rows = run(cfg, tmp_path / "cls", progress=False)  # the assets are part of `make setup`
    assert [r["round"] for r in rows] == [0, 1, 2]
    # accuracy is a count of the 32 evaluated examples, and training moved the head
    assert rows[-1]["accuracy"] * 32 == pytest.approx(round(rows[-1]["accuracy"] * 32))
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "cls" / "model.safetensors")
    assert any("classifier.modules_to_save" in k for k in saved)
    assert all(".lora_" in k or "classifier" in k for k in saved)
    import json

    summary = json.loads((tmp_path / "cls" / "summary.json").read_text())
    assert summary["trainable_params"] == sum(t.numel() for t in saved.values())
    assert summary["model_params"] > 10 * summary["trainable_params"]
