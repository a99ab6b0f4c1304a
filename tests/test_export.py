"""fedtune.export on tiny models: each method's run, exported, loads in transformers / peft
offline and gives the logits of the run's final model (the one the round loop held); FeDeRA's
adapters are converted to the original base; generation uses the run's prompt template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fedtune import cli, export
from fedtune import experiment as ex
from fedtune.config import load_config
from fedtune.engines.inprocess import LocalTransport
from fedtune.engines.rounds import Progress, federate
from fedtune.methods.base import trainable_parameters
from fedtune.methods.lora import ADAPTER, lora_layers
from fedtune.tasks import alpaca_prompt

from .conftest import BASE, tiny_overrides

CLASSIFIER = {"data.source": "rotten_tomatoes", "data.task": "classification",
              "data.path": None, "data.max_examples": 200, "model.pooling": "mean"}
RUNS = {
    "fedavg": {"method.name": "fedavg"},
    "fedavg-bf16": {"method.name": "fedavg", "model.dtype": "bfloat16"},
    "ferret": {"method.name": "ferret", "method.k": 64, "federation.rounds": 1},
    "fedit": {"method.name": "fedit", "method.rank": 4, "train.lr": 0.5},
    "federa": {"method.name": "federa", "method.rank": 4, "train.lr": 0.5},
    "fedit-cls": {"method.name": "fedit", "method.rank": 4, "train.lr": 0.5, **CLASSIFIER},
}


@pytest.fixture(scope="module")
def runs(shared_jsonl_data, tmp_path_factory):
    """name -> (run folder, the run's final model, its experiment), each run made on first use."""
    root = tmp_path_factory.mktemp("runs")
    cache: dict[str, tuple[Path, torch.nn.Module, ex.Experiment]] = {}

    def get(name: str):
        if name not in cache:
            cfg = load_config(BASE, tiny_overrides(shared_jsonl_data, root, **{"eval.generate": False,
                                                                  **RUNS[name]}))
            exp = ex.setup(cfg)
            model = ex.build_model(exp)
            client, server = ex.build_client(exp, model), ex.build_server(exp, model)
            federate(exp, server, client, LocalTransport(exp, client, Progress(False)),
                     root / name, out=Progress(False))
            cache[name] = (root / name, model, exp)
        return cache[name]

    return get


def _logits(model, exp) -> torch.Tensor:
    batch = exp.task.collate(exp.test[:4])
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits.float()


@pytest.mark.parametrize("name", ["fedavg", "fedavg-bf16", "ferret"])
def test_full_parameter_run_exports_a_hugging_face_folder(name, runs, tmp_path):
    run_dir, model, exp = runs(name)
    out = export.export_run(run_dir, tmp_path / "out")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (out / f).is_file(), f
    loaded = AutoModelForCausalLM.from_pretrained(out)
    want_dtype = torch.bfloat16 if "bf16" in name else torch.float32
    assert {p.dtype for p in loaded.parameters()} == {want_dtype}
    assert torch.equal(_logits(loaded, exp), _logits(model, exp))
    tok = AutoTokenizer.from_pretrained(out)
    text = alpaca_prompt("Repeat the second word.", "red blue")
    assert tok(text)["input_ids"] == exp.tokenizer(text)["input_ids"]
    assert tok.pad_token_id == exp.tokenizer.pad_token_id
    info = json.loads((out / export.EXPORT_INFO).read_text())
    assert info["kind"] == "full" and info["method"] == name.split("-")[0]
    # The in-memory model (what the round loop would hand over) gives the same folder.
    again = export.export_run(run_dir, tmp_path / "again", model=model)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_fedit_exports_a_peft_adapter_and_a_merged_folder(runs, tmp_path):
    run_dir, model, exp = runs("fedit")
    out = export.export_run(run_dir, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    peft = PeftModel.from_pretrained(export.build_base(exp.cfg), out)
    assert torch.allclose(_logits(peft, exp), _logits(model, exp), rtol=0, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(
        export.export_run(run_dir, tmp_path / "merged", merge=True))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_logits(merged, exp), _logits(model, exp), rtol=0, atol=1e-5)


def test_federa_adapters_are_converted_to_the_original_base(runs, tmp_path):
    run_dir, model, exp = runs("federa")
    # The run moved its adapters away from the SVD initialisation (else the test proves nothing).
    init = ex.build_model(exp)
    moved = max((dict(lora_layers(model))[n].lora_B[ADAPTER].weight - layer.lora_B[ADAPTER].weight)
                .abs().max().item() for n, layer in lora_layers(init))
    assert moved > 1e-3
    out = export.export_run(run_dir, tmp_path / "adapter")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["lora_alpha"] == 2 * exp.method_cfg.alpha
    want = _logits(model, exp)
    peft = PeftModel.from_pretrained(export.build_base(exp.cfg), out)
    got = _logits(peft, exp)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    # The run's adapters as they are, on the original base, are a different model: the
    # conversion is what makes the export right.
    naive = tmp_path / "naive"
    model.save_pretrained(naive)
    wrong = _logits(PeftModel.from_pretrained(export.build_base(exp.cfg), naive), exp)
    assert (wrong - want).abs().max() > 100 * (got - want).abs().max() + 1e-3
    merged = AutoModelForCausalLM.from_pretrained(
        export.export_run(run_dir, tmp_path / "merged", merge=True))
    assert torch.allclose(_logits(merged, exp), want, rtol=0, atol=1e-5)


def test_mean_pooling_classifier_exports_with_labels(runs, tmp_path):
    run_dir, model, exp = runs("fedit-cls")
    want = _logits(model, exp)
    adapter = export.export_run(run_dir, tmp_path / "adapter")
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and "classifier" in saved["modules_to_save"]
    peft = PeftModel.from_pretrained(export.build_base(exp.cfg), adapter)
    assert torch.allclose(_logits(peft, exp), want, rtol=0, atol=1e-6)
    merged_dir = export.export_run(run_dir, tmp_path / "merged", merge=True)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir,
                                                                trust_remote_code=True)
    assert type(merged).__name__ == export.MEAN_POOLING_CLASS
    assert merged.config.id2label == {0: "rotten", 1: "fresh"}
    assert merged.config.label2id == {"rotten": 0, "fresh": 1}
    assert merged.config.fedtune_pooling == "mean"
    assert torch.allclose(_logits(merged, exp), want, rtol=0, atol=1e-5)


def test_export_refuses_what_it_cannot_export(runs, shared_jsonl_data, tmp_path):
    with pytest.raises(export.ExportError, match="no config.yaml"):
        export.export_run(tmp_path, tmp_path / "out")
    cfg = load_config(BASE, tiny_overrides(shared_jsonl_data, tmp_path, **{
        "output.save_model": False, "federation.rounds": 1, "eval.generate": False}))
    from fedtune.engines.inprocess import run

    run(cfg, tmp_path / "nosave", progress=False)
    with pytest.raises(export.ExportError, match="no model.safetensors"):
        export.export_run(tmp_path / "nosave", tmp_path / "out")
    run_dir, _, _ = runs("fedavg")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(export.ExportError, match="holds no fedtune export"):
        export.export_run(run_dir, busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    # A previous export is replaced; the CLI says what went wrong in one line, exit status 2.
    out = tmp_path / "out"
    assert cli.main(["export", str(run_dir), str(out)]) == 0
    assert cli.main(["export", str(run_dir), str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert cli.main(["export", str(tmp_path / "nosave"), str(tmp_path / "o2")]) == 2


def test_generate_answers_with_the_run_prompt_template(runs, tmp_path, capsys):
    run_dir, model, exp = runs("fedavg")
    tok = exp.tokenizer
    prompt = alpaca_prompt("Repeat the second word.", "red blue")
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        direct = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                do_sample=False, max_new_tokens=6,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    want = tok.decode(direct[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert direct.shape[1] > ids.shape[1]
    rebuilt, rtok = export.load_for_generation(run_dir)
    assert export.answer(rebuilt, rtok, "Repeat the second word.", "red blue",
                         max_new_tokens=6) == want
    assert cli.main(["generate", str(run_dir), "Repeat the second word.", "--input",
                     "red blue", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == want
    folder = export.export_run(run_dir, tmp_path / "hf")
    assert cli.main(["generate", str(folder), "Repeat the second word.", "--input",
                     "red blue", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == want
    assert trainable_parameters(model)  # the run's model was not consumed
