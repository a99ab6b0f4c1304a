"""``fedtune compare``: runs side by side. A table (method, rounds, final and best evaluation
loss, accuracy / Rouge-L beside their trivial baselines, bytes up and down in total and per
client-round, wall time, peak memory), printed and written as markdown, and PNG plots (evaluation
loss and the task metric against the round and against the cumulative bytes sent), embedded in a
``report.md``.

Everything is read from the run folders (``metrics.jsonl``, ``summary.json``, ``config.yaml``):
nothing is re-run. A run that has not finished (no ``summary.json``) is compared on the rounds it
has, and marked so.

::

    OUT/table.md      the table (markdown)
    OUT/by_round.png  eval loss and task metric against the round
    OUT/by_bytes.png  the same against the cumulative bytes sent (up + down, log scale)
    OUT/report.md     the table, the plots, what each run was
    OUT/compare.json  the table's numbers
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.evaluation import BASELINE_KEYS, SCORER_NAME
from fedtune.runlog import atomic_write_bytes


class CompareError(ValueError):
    """Runs that cannot be compared (a folder that is no run); the message names it."""


@dataclass
class Run:
    label: str
    dir: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config: dict[str, Any]

    @property
    def method(self) -> str:
        return (self.summary or {}).get("method") or self.config.get("method", {}).get("name", "?")

    @property
    def task(self) -> str:
        return self.config.get("data", {}).get("task", "instruction")

    @property
    def metric(self) -> str | None:
        """The run's task metric: accuracy where it has one (classifiers, labelled instruction
        tasks), else Rouge-L, else None."""
        for key in ("accuracy", "rouge_l"):
            if any(r.get(key) is not None for r in self.rows):
                return key
        return None

    @property
    def rouge_scorer(self) -> str:
        """The Rouge-L scorer named by the run's round-0 row (which holds the baselines it
        scored), else by its summary; runs before ``eval.rouge`` existed used rouge-score."""
        first = self.rows[0] if self.rows else {}
        return first.get("rouge_scorer") or (self.summary or {}).get("rouge_scorer", SCORER_NAME)

    def baselines(self) -> dict[str, float]:
        found = dict((self.summary or {}).get("baselines") or {})
        first = self.rows[0] if self.rows else {}
        for k in BASELINE_KEYS:
            if k not in found and first.get(k) is not None:
                found[k] = first[k]
        return found


def read_run(path: str | Path, label: str | None = None) -> Run:
    import yaml

    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise CompareError(f"{path}: no metrics.jsonl; is it a fedtune run folder?")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        raise CompareError(f"{metrics} is empty: the run has not evaluated anything yet")
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    conf_path = path / "config.yaml"
    config = (yaml.safe_load(conf_path.read_text()) or {}) if conf_path.is_file() else {}
    return Run(label or path.name, path, rows, summary, config)


def _labels(paths: list[Path]) -> list[str]:
    """Folder names, made unique with as many parent folders as needed."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


# --- the table ---------------------------------------------------------------------------------


def run_numbers(run: Run) -> dict[str, Any]:
    """The table's numbers for one run."""
    rows = run.rows
    trained = [r for r in rows if r.get("round", 0) >= 1]
    losses = [(r["eval_loss"], r["round"]) for r in rows if r.get("eval_loss") is not None]
    final_loss = losses[-1][0] if losses else None
    best = min(losses) if losses else (None, None)
    client_rounds = sum(len(r.get("clients", [])) for r in trained)
    up = sum(r.get("bytes_up_total", 0) for r in trained)
    down = sum(r.get("bytes_down_total", 0) for r in trained)
    s = run.summary or {}
    wall = s.get("wall_time_s")
    if wall is None:
        wall = sum(r.get("time_round", 0.0) for r in trained) + rows[0].get("time_eval", 0.0)
    out: dict[str, Any] = {
        "run": run.label,
        "method": run.method,
        "finished": run.summary is not None,
        "rounds": len(trained),
        "eval_loss_first": losses[0][0] if losses else None,
        "eval_loss_final": final_loss,
        "eval_loss_best": best[0],
        "eval_loss_best_round": best[1],
        "bytes_up_total": up,
        "bytes_down_total": down,
        "client_rounds": client_rounds,
        "bytes_up_per_client_round": up / client_rounds if client_rounds else None,
        "bytes_down_per_client_round": down / client_rounds if client_rounds else None,
        "wall_time_s": wall,
        "peak_rss_mb": s.get("peak_rss_mb", max(r.get("peak_rss_mb", 0.0) for r in rows)),
    }
    gpu = [r["peak_gpu_mb"] for r in rows if r.get("peak_gpu_mb") is not None]
    if gpu:
        out["peak_gpu_mb"] = max(gpu)
    for key in ("accuracy", "rouge_l"):
        points = [r[key] for r in rows if r.get(key) is not None]
        if points:
            out[f"{key}_first"], out[f"{key}_final"] = points[0], points[-1]
    out.update(run.baselines())
    return out


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


COLUMNS: list[tuple[str, str]] = [
    ("run", "run"), ("method", "method"), ("rounds", "rounds"),
    ("eval_loss_final", "final eval loss"), ("eval_loss_best", "best eval loss (round)"),
    ("accuracy_final", "accuracy"), ("accuracy_majority", "majority-label accuracy"),
    ("rouge_l_final", "Rouge-L"), ("rouge_l_copy", "Rouge-L of copying the input"),
    ("rouge_l_empty", "Rouge-L of an empty answer"),
    ("bytes_up_total", "up total"), ("bytes_down_total", "down total"),
    ("bytes_up_per_client_round", "up / client-round"),
    ("bytes_down_per_client_round", "down / client-round"),
    ("wall_time_s", "wall time"), ("peak_rss_mb", "peak RSS"), ("peak_gpu_mb", "peak GPU"),
]


def _cell(key: str, n: dict[str, Any]) -> str:
    v = n.get(key)
    if key == "run":
        return v + ("" if n["finished"] else " (unfinished)")
    if key in ("method",):
        return str(v)
    if key == "rounds":
        return str(v)
    if key == "eval_loss_best":
        return "-" if v is None else f"{v:.4f} ({n['eval_loss_best_round']})"
    if key.startswith("eval_loss"):
        return _f(v, ".4f")
    if key.startswith(("accuracy", "rouge")):
        return _f(v, ".3f")
    if key.startswith("bytes"):
        return human_bytes(v)
    if key == "wall_time_s":
        return _f(v, ".1f") + (" s" if v is not None else "")
    if key.startswith("peak"):
        return _f(v, ".0f") + (" MiB" if v is not None else "")
    return str(v)


def table_cells(numbers: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the table; a column no run has a value for is left out."""
    cols = [(k, h) for k, h in COLUMNS if any(n.get(k) is not None for n in numbers)]
    return [h for _, h in cols], [[_cell(k, n) for k, _ in cols] for n in numbers]


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    right = [i for i in range(len(head)) if i >= 2]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def text_table(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def baseline_lines(run: Run) -> list[str]:
    """The run's final task metrics, each beside the trivial baselines of the same examples
    (what ``fedtune report`` prints under the table)."""
    n = run_numbers(run)
    lines = []
    if n.get("accuracy_final") is not None:
        base = n.get("accuracy_majority")
        lines.append(f"accuracy {n['accuracy_final']:.4f} after round {n['rounds']}; "
                     + ("majority-label accuracy " + format(base, ".4f") if base is not None
                        else "no majority-label baseline recorded"))
    if n.get("rouge_l_final") is not None:
        parts = [f"{label} {n[k]:.4f}" for k, label in
                 (("rouge_l_copy", "copying the input"), ("rouge_l_empty", "an empty answer"))
                 if n.get(k) is not None]
        lines.append(f"Rouge-L {n['rouge_l_final']:.4f} after round {n['rounds']}; "
                     + (", ".join(parts) if parts else "no baselines recorded")
                     + f" ({run.rouge_scorer})")
    return lines


def bytes_line(run: Run) -> str | None:
    """Bytes per client-round beside what FedAvg sends: the whole model in float32, about
    4 B per parameter each way (plus a few kB of tensor names)."""
    n, params = run_numbers(run), (run.summary or {}).get("model_params")
    if not n["client_rounds"] or not params:
        return None
    up, down = n["bytes_up_per_client_round"], n["bytes_down_per_client_round"]
    line = (f"bytes per client per round: {human_bytes(up)} up, {human_bytes(down)} down "
            f"({n['method']})")
    if n["method"] != "fedavg":
        line += (f"; FedAvg would send the float32 weights, about {human_bytes(4 * params)} "
                 f"each way ({4 * params / max(up, 1):,.0f}x this upload)")
    return line


# --- the plots ---------------------------------------------------------------------------------

METRIC_LABELS = {"accuracy": "accuracy (share of held-out examples)",
                 "rouge_l": "Rouge-L F-measure (0 to 1)"}
BASELINE_OF = {"accuracy": ("accuracy_majority", "majority label"),
               "rouge_l": ("rouge_l_copy", "copying the input")}


def _loss_label(runs: list[Run]) -> str:
    tasks = {r.task for r in runs}
    if tasks == {"classification"}:
        return "eval loss (cross-entropy, nats per example)"
    if tasks == {"instruction"}:
        return "eval loss (cross-entropy, nats per response token)"
    return "eval loss (cross-entropy, nats)"


def _metric_label(runs: list[Run]) -> str | None:
    metrics = {r.metric for r in runs} - {None}
    if not metrics:
        return None
    if len(metrics) == 1:
        return METRIC_LABELS[metrics.pop()]
    return "task metric (accuracy or Rouge-L F, 0 to 1)"


def _series(run: Run, key: str, x: str) -> tuple[list[float], list[float]]:
    xs, ys, cum = [], [], 0
    for r in run.rows:
        cum += r.get("bytes_up_total", 0) + r.get("bytes_down_total", 0)
        if r.get(key) is None:
            continue
        if x == "round":
            xs.append(r["round"])
        elif r["round"] >= 1:  # round 0 sent nothing: no place on a log axis
            xs.append(cum)
        else:
            continue
        ys.append(r[key])
    return xs, ys


def plot(runs: list[Run], path: Path, x: str) -> Path:
    """Two panels, eval loss and task metric, against ``x`` (``round`` or ``bytes``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_label = _metric_label(runs)
    panels = 2 if metric_label else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    markers = "osD^vP*Xh<>"
    for i, run in enumerate(runs):
        name = run.label if run.label == run.method else f"{run.label} ({run.method})"
        style = {"color": colours(i % 10), "marker": markers[i % len(markers)], "label": name,
                 "linewidth": 1.8, "markersize": 5, "alpha": 0.9}
        axes[0][0].plot(*_series(run, "eval_loss", x), **style)
        if metric_label and run.metric:
            axes[0][1].plot(*_series(run, run.metric, x), **style)
    if metric_label:  # one dashed line per distinct baseline; grey when every run shares it
        lines: dict[tuple[str, float], list[int]] = {}
        for i, run in enumerate(runs):
            if run.metric:
                key, _ = BASELINE_OF[run.metric]
                base = run.baselines().get(key)
                if base is not None:
                    lines.setdefault((run.metric, round(base, 6)), []).append(i)
        for (metric, base), who in lines.items():
            shared = len(who) == len(runs) and len(runs) > 1
            whose = "all runs" if shared or len(runs) == 1 else ", ".join(
                runs[i].label for i in who)
            axes[0][1].axhline(base, color="0.35" if shared else colours(who[0] % 10),
                               linestyle="--", linewidth=1.2,
                               label=f"{BASELINE_OF[metric][1]} ({whose}): {base:.3f}")
    xlabel = ("round (0 = before training)" if x == "round"
              else "cumulative bytes sent, up + down (B, log scale)")
    titles = ["evaluation loss", "task metric (dashed: trivial baseline)"]
    for j in range(panels):
        ax = axes[0][j]
        ax.set_xlabel(xlabel)
        ax.set_title(titles[j] + (" by round" if x == "round" else " by bytes sent"))
        ax.grid(True, alpha=0.3)
        if x == "bytes":
            ax.set_xscale("log")
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    axes[0][0].set_ylabel(_loss_label(runs))
    if metric_label:
        axes[0][1].set_ylabel(metric_label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the report --------------------------------------------------------------------------------


@dataclass
class Report:
    out: Path
    numbers: list[dict[str, Any]]
    table_text: str
    table_markdown: str
    files: list[Path] = field(default_factory=list)


def _describe_run(run: Run) -> str:
    c = run.config
    model, data = c.get("model", {}), c.get("data", {})
    part, fed, train = c.get("partition", {}), c.get("federation", {}), c.get("train", {})
    method = c.get("method", {})
    opts = ", ".join(f"{k}={v}" for k, v in sorted((method.get("options") or {}).items()))
    return (f"- **{run.label}** (`{run.dir}`): {run.method}"
            f"{f' ({opts})' if opts else ''}; model {model.get('source')}"
            f"{' ' + str(model.get('path')) if model.get('path') else ''} "
            f"({model.get('dtype', 'float32')}); data {data.get('source')} ({data.get('task')}); "
            f"{part.get('num_clients')} clients ({part.get('scheme')}"
            f"{', alpha ' + str(part.get('alpha')) if part.get('scheme') == 'dirichlet' else ''}"
            f"), {fed.get('clients_per_round')} sampled per round; {train.get('optimizer')} lr "
            f"{train.get('lr')}, {train.get('local_steps')} local steps of batch "
            f"{train.get('batch_size')}" + ("" if run.summary else "; **unfinished**"))


def compare(paths: list[str | Path], out: str | Path) -> Report:
    """Read the runs in ``paths``, write the table, the plots and the report to ``out``."""
    if not paths:
        raise CompareError("give at least one run folder")
    paths = [Path(p) for p in paths]
    if len({p.resolve() for p in paths}) != len(paths):
        raise CompareError("the same run folder is given twice")
    runs = [read_run(p, label) for p, label in zip(paths, _labels(paths))]
    numbers = [run_numbers(r) for r in runs]
    head, body = table_cells(numbers)
    md, txt = markdown_table(head, body), text_table(head, body)
    scorers = sorted({r.rouge_scorer for r in runs if any("rouge_l" in x for x in r.rows)})
    if scorers:  # every table that shows Rouge-L says which scorer computed it
        note = f"\n\nRouge-L: {', '.join(scorers)}."
        md, txt = md + note, txt + note
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, numbers, txt, md)
    atomic_write_bytes(out / "table.md", (md + "\n").encode())
    report.files.append(out / "table.md")
    report.files.append(plot(runs, out / "by_round.png", "round"))
    report.files.append(plot(runs, out / "by_bytes.png", "bytes"))
    atomic_write_bytes(out / "compare.json",
                       (json.dumps(numbers, indent=2, sort_keys=True) + "\n").encode())
    report.files.append(out / "compare.json")
    lines = [
        "# fedtune comparison", "",
        md, "",
        ("Final and best evaluation loss over the held-out examples (best: the lowest at any "
         "evaluation, its round in brackets; round 0 is before training). Bytes are the lengths "
        "of the encoded messages: *up* client to server, *down* server to client, in total and "
        "per client-round (one sampled client in one round). Wall time is the run's process; "
        "peak RSS its resident memory. Beside each task metric its trivial baseline on the same "
        "examples: the majority-label accuracy, the Rouge-L of copying the input and of an empty "
        "answer."), "",
        "## By round", "", "![evaluation loss and task metric by round](by_round.png)", "",
        "## By bytes sent", "",
        "![evaluation loss and task metric by cumulative bytes sent](by_bytes.png)", "",
        ("Cumulative bytes up + down after each round, log scale (round 0, before anything is "
         "sent, has no place on it)."), "",
        "## The runs", "", *[_describe_run(r) for r in runs], "",
    ]
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
    report.files.insert(0, out / "report.md")
    return report
