"""Exported HF folder -> lm-eval results, printed in the layout of Table 2 (paper Sec. 4.1 "Evaluation").

    python -m lemon_composer.evaluate --model out/lemon-1.3b-hf                    # the paper's suite
    python -m lemon_composer.evaluate --model DIR --tasks sciq arc_c --limit 100 --out results.json
    python -m lemon_composer.evaluate --model DIR --tasks bigbench:social_iqa.json all-local:bigbench-mc/

``--tasks`` takes suite tasks by short key or lm-eval name (each with its paper shot count),
``bigbench:<task.json>`` files and ``all-local:<folder>`` (every ``*.json`` and ``*/task.json``
there), space- or comma-separated. The JSON written by ``--out`` holds fractions in [0, 1];
the table shows percentages.
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
from lm_eval.evaluator import evaluate as lm_eval_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from lemon_composer.atomic import atomic_write_text
from lemon_composer.cli import run_cli
from lemon_composer.eval.bigbench_local import write_tasks
from lemon_composer.eval.perplexity import model_config, torch_device
from lemon_composer.eval.suite import AVERAGE_COLUMN, SUITE, suite_names, suite_task

log = logging.getLogger(__name__)

BIGBENCH = "bigbench:"
ALL_LOCAL = "all-local:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class EvalTask:
    """One lm-eval task (or group) to run and the metric that becomes its table column."""
    name: str
    num_fewshot: int
    metric: str
    filter: str
    column: str


def parse_tasks(specs: Sequence[str], *, num_fewshot: int | None = None) -> tuple[list[EvalTask], list[Path]]:
    """Suite tasks (in Table 2 order, paper shots unless ``num_fewshot``) and the BIG-bench files named.

    Raises:
        ValueError: an unknown name (with near matches), or an ``all-local:`` folder without task files.
    """
    wanted, files = set(), []
    for spec in (s for arg in specs for s in arg.split(",") if s):
        if spec.startswith(BIGBENCH):
            files.append(Path(spec[len(BIGBENCH):]))
        elif spec.startswith(ALL_LOCAL):
            folder = Path(spec[len(ALL_LOCAL):])
            found = sorted(folder.glob("*.json")) + sorted(folder.glob("*/task.json"))
            if not found:
                raise ValueError(f"--tasks {spec}: no *.json or */task.json files in {folder}")
            files += found
        elif (task := suite_task(spec)) is not None:
            wanted.add(task)
        else:
            near = difflib.get_close_matches(spec, suite_names(), n=3, cutoff=0.5)
            hint = f" (did you mean {' / '.join(near)}?)" if near else ""
            raise ValueError(f"--tasks: unknown task {spec!r}{hint}; known: {', '.join(suite_names())}, "
                             f"{BIGBENCH}<task.json>, {ALL_LOCAL}<folder>")
    suite = [EvalTask(t.lm_eval_name, t.num_fewshot if num_fewshot is None else num_fewshot, t.metric, t.filter,
                      t.column) for t in SUITE.values() if t in wanted]
    return suite, list(dict.fromkeys(files))


def check_model_dir(model_dir: str | Path) -> None:
    """An exported HF folder: config.json and the tokenizer beside the weights."""
    model_config(model_dir)
    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"--model={model_dir}: no tokenizer files there (one of {', '.join(TOKENIZER_FILES)}); "
                         f"save the tokenizer into the model folder")


def run_task(lm: HFLM, task: EvalTask, task_manager: TaskManager, *, limit: int | None) -> dict:
    """Evaluate one task; ``{metric, value, stderr, num_fewshot, n, metrics}`` (fractions).

    Does what ``lm_eval.simple_evaluate`` does around ``lm_eval.evaluator.evaluate`` (seeds, shot
    count, few-shot seed), with this task's own shot count where simple_evaluate takes one for all
    tasks, and without its run metadata (a ``git describe`` subprocess and torch's collect_env).
    """
    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    loaded = task_manager.load([task.name])
    for task_obj in loaded["tasks"].values():
        task_obj.set_config(key="num_fewshot", value=task.num_fewshot)
        task_obj.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    results = lm_eval_evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False)["results"][task.name]
    key = f"{task.metric},{task.filter}"
    if key not in results:
        raise ValueError(f"--tasks {task.name}: lm-eval reported {sorted(results)}, not {key}")
    stderr = results.get(f"{task.metric}_stderr,{task.filter}")
    metrics = {}
    for k, v in results.items():
        metric, _, flt = k.partition(",")
        if flt and not metric.endswith("_stderr"):
            metrics[metric if flt == "none" else k] = v
    return {"metric": task.metric, "value": results[key],
            "stderr": stderr if isinstance(stderr, float) else None,
            "num_fewshot": task.num_fewshot, "n": results["sample_len"], "metrics": metrics}


def evaluate(model_dir: str | Path, tasks: Sequence[str] | None = None, *, batch_size: int = 8,
             device: str = "cpu", limit: int | None = None, num_fewshot: int | None = None) -> dict:
    """Run lm-eval on the HF folder ``model_dir``; ``{model, tasks: {name: ...}, average}``.

    Every argument is checked (task names, BIG-bench files, model folder, device) before the
    model loads. ``tasks`` defaults to the paper's suite.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size}: must be at least 1")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit={limit}: must be at least 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot={num_fewshot}: must be at least 0")
    suite, files = parse_tasks(list(SUITE) if tasks is None else tasks, num_fewshot=num_fewshot)
    if not suite and not files:
        raise ValueError(f"--tasks {' '.join(tasks or [])}: names no task")
    check_model_dir(model_dir)
    dev = torch_device(device)
    with tempfile.TemporaryDirectory(prefix="lemon-eval-") as work:
        names, include = write_tasks(files, work) if files else ([], None)
        plan = suite + [EvalTask(n, num_fewshot or 0, "acc", "none", n) for n in names]
        # lm-eval's own task index takes ~10 s to build: only when a suite task needs it.
        task_manager = TaskManager(include_path=include, include_defaults=bool(suite))
        lm = HFLM(pretrained=str(model_dir), device=str(dev), batch_size=batch_size,
                  dtype="float32" if dev.type == "cpu" else "auto")
        results = {}
        for i, task in enumerate(plan, 1):
            log.info("evaluate [%d/%d] %s: %d-shot, %s", i, len(plan), task.name, task.num_fewshot, task.metric)
            results[task.name] = run_task(lm, task, task_manager, limit=limit)
            log.info("evaluate [%d/%d] %s: %s = %.4f (n=%d)", i, len(plan), task.name, task.metric,
                     results[task.name]["value"], results[task.name]["n"])
    average = sum(r["value"] for r in results.values()) / len(results)
    return {"model": str(model_dir), "tasks": results, "average": average}


def format_table(summary: dict) -> str:
    """Table 2's layout: one row for the model, a column per task run (percent, one decimal), Average."""
    columns = [(suite_task(n).column if suite_task(n) else n, r["value"]) for n, r in summary["tasks"].items()]
    columns.append((AVERAGE_COLUMN, summary["average"]))
    label = Path(summary["model"]).name or summary["model"]
    cells = [(head, f"{100 * value:.1f}") for head, value in columns]
    widths = [max(len(h), len(v)) for h, v in cells]
    first = max(len("Model"), len(label))
    header = "  ".join([f"{'Model':<{first}}"] + [f"{h:>{w}}" for (h, _), w in zip(cells, widths)])
    row = "  ".join([f"{label:<{first}}"] + [f"{v:>{w}}" for (_, v), w in zip(cells, widths)])
    return f"{header}\n{row}"


def write_json(summary: dict, out: Path) -> None:
    """Write ``summary`` to ``out`` through a temporary name, so a reader never sees half a file."""
    atomic_write_text(out, json.dumps(summary, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``lemon-eval`` / ``python -m lemon_composer.evaluate``; exit 2 with one line for a user error."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported HF folder (config.json, weights, tokenizer)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help=f"default: the paper suite ({' '.join(SUITE)})")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (for quick checks)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results path")
    parser.add_argument("--num-fewshot", type=int, default=None, help="override every task's shot count")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def body() -> None:
        if args.out is not None:
            check_writable(args.out)  # before the evaluation, not after it
        summary = evaluate(args.model, args.tasks, batch_size=args.batch_size, device=args.device,
                           limit=args.limit, num_fewshot=args.num_fewshot)
        print(format_table(summary))
        if args.out is not None:
            write_json(summary, args.out)
            log.info("evaluate: results written to %s", args.out)
    return run_cli("evaluation", body)


def check_writable(out: Path) -> None:
    """``--out`` can be written: its folder exists (or can be made) and takes a file."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out={out}: cannot be written ({err.strerror})") from None
    if out.is_dir():
        raise ValueError(f"--out={out}: is a folder; expected a JSON file path")


if __name__ == "__main__":
    sys.exit(main())
