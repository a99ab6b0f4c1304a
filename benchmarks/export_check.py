"""Export check on SmolLM2 (issue 13): a short real run (the code path of `fedtune run`, with the
final model kept in memory), `fedtune export RUN_DIR OUT`, the export loaded offline with plain
transformers / peft, logits compared with the run's final model on held-out prompts.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/export_check.py fedavg|federa WORKDIR
"""
import json
import sys
import time
from pathlib import Path

import torch

from fedtune import cli
from fedtune import experiment as ex
from fedtune.config import load_config
from fedtune.engines.inprocess import LocalTransport
from fedtune.engines.rounds import Progress, federate
from fedtune.models import smollm2_folder

method, work = sys.argv[1], Path(sys.argv[2])
over = ["model.source=smollm2", "model.device=cpu", "data.source=rotten_tomatoes",
        "data.task=instruction", "data.max_length=64", "partition.scheme=iid",
        "partition.num_clients=8", "federation.rounds=1", "federation.clients_per_round=0.25",
        "train.optimizer=adamw", "train.local_steps=2", "train.batch_size=4",
        "eval.max_examples=16", "eval.generate=false", "output.export=false",
        f"method.name={method}"]
if method == "federa":
    over += ["method.rank=8", "method.alpha=16", "train.lr=3e-4"]
else:
    over += ["train.lr=1e-5"]
cfg = load_config(None, over)
print("overrides:", " ".join(over))
t0 = time.perf_counter()
exp = ex.setup(cfg)
model = ex.build_model(exp)
w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
client, server = ex.build_client(exp, model), ex.build_server(exp, model)
run_dir = work / f"run-{method}"
rows = federate(exp, server, client, LocalTransport(exp, client, Progress(False)), run_dir,
                out=Progress(False))
moved = max((p.detach() - w0[n]).abs().max().item()
            for n, p in model.named_parameters() if n in w0)
print(f"run: {time.perf_counter() - t0:.0f} s, eval loss {rows[0]['eval_loss']:.4f} -> "
      f"{rows[-1]['eval_loss']:.4f}, max |trainable change| {moved:.3g}")

out = work / f"export-{method}"
assert cli.main(["export", str(run_dir), str(out)]) == 0
print("export files:", sorted(p.name for p in out.iterdir()))

batch = exp.task.collate(exp.test[:8])


def logits(m):
    with torch.no_grad():
        return m.eval()(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits.float()


want = logits(model)
from transformers import AutoModelForCausalLM

if method == "federa":
    from peft import PeftModel

    base_dir = smollm2_folder()
    conf = json.loads((out / "adapter_config.json").read_text())
    print("adapter_config r", conf["r"], "lora_alpha", conf["lora_alpha"],
          "base_model_name_or_path", conf.get("base_model_name_or_path"))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, out)
    got = logits(loaded)
    naive = logits(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
    print(f"base alone vs run's model: max abs diff {(naive - want).abs().max().item():.3g}")
    merged_dir = work / "export-federa-merged"
    assert cli.main(["export", str(run_dir), str(merged_dir), "--merge"]) == 0
    merged = logits(AutoModelForCausalLM.from_pretrained(merged_dir))
    print(f"merged export vs run's model: max abs diff {(merged - want).abs().max().item():.3g}")
else:
    loaded = AutoModelForCausalLM.from_pretrained(out)
    got = logits(loaded)
    base = logits(AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32))
    print(f"pretrained alone vs run's model: max abs diff {(base - want).abs().max().item():.3g}")
print(f"logits {tuple(want.shape)}: export vs run's model: max abs diff "
      f"{(got - want).abs().max().item():.3g}, bitwise equal {torch.equal(got, want)}")
