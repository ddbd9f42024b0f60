"""The evaluation command: the Table 2 suite, BIG-bench task.json as local lm-eval tasks, scoring checked."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import random_docs
from fusion_helpers import tiny_config, tiny_source
from lemon_composer import evaluate
from lemon_composer.eval.bigbench_local import read_task, task_docs, write_tasks
from lemon_composer.eval.suite import SUITE, TABLE2_COLUMNS, suite_task

SHARED_TASKS = ("goal_step_wikihow_goal_inference", "social_iqa", "strategyqa")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A random tiny LLaMA saved with the tiny tokenizer, as export writes an HF folder."""
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    cfg = tiny_config(vocab=len(tok))
    cfg.max_position_embeddings = 512  # BIG-bench prompts run past 128 tokens of the tiny tokenizer
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_source(cfg).save_pretrained(folder)
    tok.save_pretrained(str(folder))
    return folder


def write_task(path: Path, examples: list[dict], **keys) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": path.stem, "examples": examples, **keys}))
    return path


# ---- the suite table --------------------------------------------------------------------------

def test_suite_is_table2_with_paper_shots():
    assert TABLE2_COLUMNS == ("SciQ", "PIQA", "WinoGrande", "ARC-E", "ARC-C (25)", "HellaSwag (10)", "LogiQA",
                              "BoolQ (32)", "LAMBADA", "NQ (32)", "MMLU (5)", "Average")
    shots = {t.lm_eval_name: t.num_fewshot for t in SUITE.values()}
    assert shots == {"sciq": 0, "piqa": 0, "winogrande": 0, "arc_easy": 0, "logiqa": 0, "lambada_openai": 0,
                     "arc_challenge": 25, "hellaswag": 10, "boolq": 32, "nq_open": 32, "mmlu": 5}
    assert suite_task("arc_c") is suite_task("arc_challenge") is SUITE["arc_c"]


def test_suite_metrics_are_what_lm_eval_reports():
    """Each metric (and filter) is in the task's lm-eval 0.4.13 yaml; MMLU's group aggregates acc."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    folders = ("sciq", "piqa", "winogrande", "arc", "logiqa", "lambada", "hellaswag", "super_glue/boolq",
               "nq_open", "mmlu/default")
    index = TaskManager(include_defaults=False, include_path=[root / f for f in folders]).task_index
    for t in SUITE.values():
        cfg = index[t.lm_eval_name].cfg
        listed = cfg["aggregate_metric_list"] if t.lm_eval_name == "mmlu" else cfg["metric_list"]
        assert t.metric in [m["metric"] for m in listed], t
        filters = [f["name"] for f in cfg.get("filter_list") or []] or ["none"]
        assert filters == [t.filter], t


def test_parse_tasks_orders_as_table2_and_expands_local_folders(tmp_path):
    a = write_task(tmp_path / "local" / "a.json", [{"input": "x", "target_scores": {"y": 1}}])
    b = write_task(tmp_path / "local" / "b" / "task.json", [{"input": "x", "target_scores": {"y": 1}}])
    suite, files = evaluate.parse_tasks(["mmlu,arc_challenge", "arc_c", "sciq", f"all-local:{tmp_path / 'local'}",
                                         f"bigbench:{a}"])
    assert [(t.name, t.num_fewshot, t.metric, t.column) for t in suite] == [
        ("sciq", 0, "acc_norm", "SciQ"), ("arc_challenge", 25, "acc_norm", "ARC-C (25)"),
        ("mmlu", 5, "acc", "MMLU (5)")]
    assert files == [a, b]
    suite, _ = evaluate.parse_tasks(["nq", "boolq"], num_fewshot=3)
    assert [(t.name, t.num_fewshot, t.filter) for t in suite] == [("boolq", 3, "none"),
                                                                  ("nq_open", 3, "remove_whitespace")]
    with pytest.raises(ValueError, match=r"--tasks all-local:.*: no \*\.json"):
        evaluate.parse_tasks([f"all-local:{tmp_path / 'empty'}"])


# ---- argument errors, all before the model loads -----------------------------------------------

def fails(argv: list[str], capsys, match: str) -> None:
    """``lemon-eval`` exits 2 with one line naming the flag, no traceback."""
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err, err


def test_unknown_task_is_rejected_with_near_matches(tmp_path, capsys):
    fails(["--model", str(tmp_path / "no-model"), "--tasks", "sciq", "arc_chalenge"], capsys,
          r"error: --tasks: unknown task 'arc_chalenge' \(did you mean arc_challenge")
    with pytest.raises(ValueError, match=r"unknown task 'hellaswg' \(did you mean hellaswag.*; known: arc_c, "):
        evaluate.parse_tasks(["hellaswg"])


def test_model_folder_needs_config_and_tokenizer(model_dir, tmp_path, capsys):
    fails(["--model", str(tmp_path), "--tasks", "sciq"], capsys, r"--model=.*: no config\.json there")
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    fails(["--model", str(tmp_path), "--tasks", "sciq"], capsys, r"--model=.*: no tokenizer files there")


def test_cuda_without_cuda_is_an_error(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same check on GPU machines too
    fails(["--model", str(model_dir), "--tasks", "sciq", "--device", "cuda"], capsys, r"--device=cuda: CUDA is not available")


def test_unwritable_out_is_found_before_the_evaluation(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    fails(["--model", str(model_dir), "--tasks", "sciq", "--out", str(blocker / "results.json")], capsys,
          r"error: --out=.*results.json: cannot be written")


# ---- BIG-bench task.json -> lm-eval task --------------------------------------------------------

def test_bigbench_conversion_writes_the_expected_jsonl_and_yaml(tmp_path):
    custom = write_task(tmp_path / "src" / "custom.json", [
        {"input": "2 + 2 =", "target_scores": {"3": 0, "4": 1, "5": 0}},
        {"input": "Sky?", "target_scores": {"blue": 1.0, "green": 0.0}, "target": "blue"},
    ], task_prefix="Answer {{ briefly }}.\n", example_input_prefix="\nQuestion: ", example_output_prefix="\nAnswer:",
        choice_prefix="\n- ", append_choices_to_input=False)
    default = write_task(tmp_path / "src" / "plain" / "task.json", [
        {"input": "Pick one.", "target_scores": {"c": 0, "a": 0, "b": 1}}])
    names, folder = write_tasks([custom, default], tmp_path / "work")
    assert names == ["bigbench_custom", "bigbench_plain"]
    assert (folder / "bigbench_custom.jsonl").read_text() == (
        '{"query": "\\nQuestion: 2 + 2 =\\nAnswer:", "choices": ["3", "4", "5"], "gold": 1}\n'
        '{"query": "\\nQuestion: Sky?\\nAnswer:", "choices": ["blue", "green"], "gold": 0}\n')
    # BIG-bench defaults: choices listed in the prompt (sorted, then shuffled with a fixed seed)
    assert (folder / "bigbench_plain.jsonl").read_text() == (
        '{"query": "\\nQ: Pick one.\\n  choice: a\\n  choice: c\\n  choice: b\\nA: ", '
        '"choices": ["c", "a", "b"], "gold": 2}\n')
    cfg = yaml.safe_load((folder / "bigbench_custom.yaml").read_text())
    assert cfg == {
        "task": "bigbench_custom", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "bigbench_custom.jsonl")},
                           "cache_dir": str(folder / "hf_cache")},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "query", "doc_to_choice": "choices", "doc_to_target": "gold", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
        "description": "{% raw %}Answer {{ briefly }}.\n{% endraw %}",
    }
    assert "description" not in yaml.safe_load((folder / "bigbench_plain.yaml").read_text())


def test_lm_eval_builds_the_prompt_bigbench_would(tmp_path):
    from lm_eval.tasks import TaskManager

    src = write_task(tmp_path / "t.json", [{"input": "Sky?", "target_scores": {"blue": 1, "red": 0}}],
                     task_prefix="Answer {{ this }}:\n", append_choices_to_input=False)
    names, folder = write_tasks([src], tmp_path / "work")
    task = TaskManager(include_defaults=False, include_path=folder).load(names)["tasks"]["bigbench_t"]
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=1)
    assert [inst.args for inst in task.instances] == [("Answer {{ this }}:\n\nQ: Sky?\nA: ", "blue"),
                                                      ("Answer {{ this }}:\n\nQ: Sky?\nA: ", "red")]


@pytest.mark.parametrize("content, message", [
    ("{not json", r"not valid JSON"),
    ('{"name": "x"}', r"no 'examples' list"),
    ('{"examples": [{"target_scores": {"a": 1}}]}', r"examples\[0\] has no 'input'"),
    ('{"examples": [{"input": "q", "target_scores": {"a": 1}}, {"input": "q", "target": "a"}]}',
     r"examples\[1\] has no 'target_scores'"),
    ('{"examples": [{"input": "q", "target_scores": {"a": 0, "b": 0.5}}]}',
     r"examples\[0\] has no choice with score 1"),
])
def test_bigbench_errors_name_the_file(tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=rf"^{bad}: {message}"):
        write_tasks([bad], tmp_path / "work")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'missing.json'}: no such BIG-bench task file"):
        write_tasks([tmp_path / "missing.json"], tmp_path / "work")


def test_two_files_with_one_task_name_are_rejected(tmp_path):
    one = write_task(tmp_path / "a" / "same.json", [{"input": "x", "target_scores": {"y": 1}}])
    two = write_task(tmp_path / "b" / "same.json", [{"input": "x", "target_scores": {"y": 1}}])
    with pytest.raises(ValueError, match=r"gives task name bigbench_same, as .*a/same\.json does"):
        write_tasks([one, two], tmp_path / "work")


# ---- end to end ---------------------------------------------------------------------------------

def test_evaluate_the_shared_bigbench_tasks(model_dir, shared_data, tmp_path, capsys):
    out = tmp_path / "results" / "eval.json"
    tasks = [f"bigbench:{shared_data / 'bigbench-mc' / f'{t}.json'}" for t in SHARED_TASKS]
    evaluate.main(["--model", str(model_dir), "--tasks", *tasks, "--limit", "8", "--batch-size", "4",
                   "--out", str(out)])
    summary = json.loads(out.read_text())
    assert summary["model"] == str(model_dir)
    assert list(summary["tasks"]) == [f"bigbench_{t}" for t in SHARED_TASKS]
    for r in summary["tasks"].values():
        assert r["metric"] == "acc" and r["n"] == 8 and r["num_fewshot"] == 0
        assert set(r["metrics"]) == {"acc", "acc_norm"}
        assert all(0.0 <= v <= 1.0 and (8 * v).is_integer() for v in r["metrics"].values())
        assert r["value"] == r["metrics"]["acc"]
    assert summary["average"] == pytest.approx(sum(r["value"] for r in summary["tasks"].values()) / 3)
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["Model", *summary["tasks"], "Average"]
    assert row.split() == [model_dir.name, *(f"{100 * r['value']:.1f}" for r in summary["tasks"].values()),
                           f"{100 * summary['average']:.1f}"]
    assert list(out.parent.iterdir()) == [out]  # the temporary file was renamed


def choice_logliks(model, tok, query: str, choices: list[str]) -> list[float]:
    """log p(choice | query), tokenized as lm-eval's HFLM does (trailing space moves to the choice)."""
    context = query.rstrip()
    lls = []
    for choice in choices:
        whole = tok(query + choice)["input_ids"]
        n_ctx = len(tok(context)["input_ids"])
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # (T-1, V)
        lls.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
    return lls


def synthetic_examples(n: int = 8) -> list[dict]:
    """Word-salad questions with three choices of distinct lengths (so acc_norm can differ from acc)."""
    rng = random.Random(3)
    words = random_docs(rng, 40)
    return [{"input": words[i][:60],
             "target_scores": {c[: 8 + 9 * j]: int(j == 0) for j, c in enumerate(rng.sample(words[20:], 3))}}
            for i in range(n)]


def test_lm_eval_requests_score_the_choice_after_the_bigbench_prompt(model_dir, tmp_path):
    """Every loglikelihood lm-eval computes for a converted task is log p(choice | BIG-bench prompt)."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    path = write_task(tmp_path / "synthetic.json", synthetic_examples(4))
    names, folder = write_tasks([path], tmp_path / "work")
    task = TaskManager(include_defaults=False, include_path=folder).load(names)["tasks"][names[0]]
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests()
    lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=2)
    got = [ll for ll, _ in lm.loglikelihood(task.instances)]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    docs = task_docs(read_task(path))
    want = [ll for doc in docs for ll in choice_logliks(model, tok, doc["query"], doc["choices"])]
    assert got == pytest.approx(want, abs=1e-4)


def test_lm_eval_acc_matches_our_own_loglikelihood_argmax(model_dir, tmp_path):
    """Gold = our argmax for even examples and our argmin for odd ones: acc must be exactly 1/2."""
    examples = synthetic_examples()
    path = write_task(tmp_path / "synthetic.json", examples)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    expected_acc, expected_norm = [], []
    for i, (ex, doc) in enumerate(zip(examples, task_docs(read_task(path)))):
        lls = choice_logliks(model, tok, doc["query"], doc["choices"])
        best = max(range(3), key=lambda k: lls[k])
        gold = best if i % 2 == 0 else min(range(3), key=lambda k: lls[k])
        best_norm = max(range(3), key=lambda k: lls[k] / len(doc["choices"][k]))
        ex["target_scores"] = {c: int(k == gold) for k, c in enumerate(doc["choices"])}
        expected_acc.append(float(best == gold))
        expected_norm.append(float(best_norm == gold))
    write_task(path, examples)
    out = tmp_path / "eval.json"
    evaluate.main(["--model", str(model_dir), "--tasks", f"bigbench:{path}", "--batch-size", "2", "--out", str(out)])
    result = json.loads(out.read_text())["tasks"]["bigbench_synthetic"]
    assert result["n"] == 8
    assert result["metrics"]["acc"] == sum(expected_acc) / 8 == 0.5
    assert result["metrics"]["acc_norm"] == sum(expected_norm) / 8
