"""lm-eval's `--model olmoe_megatron` on a tiny trained checkpoint: a local-file multiple-choice task
scores exactly as our in-loop evaluator (same log-likelihood per request, same acc and acc_norm),
greedy generation stops at `until` strings, rolling log-likelihoods add up, bad model_args are
clear errors."""

import json
import os
import random
from pathlib import Path

import pytest

from olmoe_megatron.config.base import config_to_dict
from olmoe_megatron.recipes import get_recipe
from olmoe_megatron.testing.distributed import get_pool
from olmoe_megatron.testing.training_runs import train_run, write_synthetic_corpus
from olmoe_megatron.training.exit_codes import EXIT_OK

pytest.importorskip("lm_eval")

TASK = "olmoe_mc_local"
WORDS = "the a cat dog sat on mat ran fast slow red blue green house tree river stone light dark over".split()


def _items() -> list[dict]:
    """12 items, 3 or 4 choices, contexts of 0 to ~60 tokens (train.seq_length is 32: some are cut)."""
    rng = random.Random(0)
    items = []
    for i in range(12):
        length = (0, 3, 9, 24, 60)[i % 5]
        context = " ".join(rng.choice(WORDS) for _ in range(length)).capitalize()
        choices = [" " + " ".join(rng.choice(WORDS) for _ in range(1 + (i + j) % 3)) for j in range(3 + i % 2)]
        items.append({"id": f"q{i}", "context": context, "choices": choices, "label": (i * 7) % len(choices)})
    return items


def _task_yaml(task_file: Path, cache_dir: Path) -> str:
    """lm-eval's reading of our JSONL. Our choices carry their leading space and our acc_norm divides
    by the length without it; lm-eval adds target_delimiter and divides by the choice's length, so the
    space moves from the choice to the delimiter (the continuation text is the same)."""
    return "\n".join([
        f"task: {TASK}",
        "dataset_path: json",
        "dataset_kwargs:",
        f"  data_files: {{test: {json.dumps(str(task_file))}}}",
        f"  cache_dir: {json.dumps(str(cache_dir))}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{context}}"',
        "doc_to_choice: \"{{choices | map('regex_replace', '^ ', '') | list}}\"",
        'doc_to_target: "{{label}}"',
        'target_delimiter: " "',
        "metric_list:",
        "  - metric: acc",
        "  - metric: acc_norm",
        "",
    ])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_adapter")
    run = config_to_dict(get_recipe("olmoe_tiny"))
    run["data"].update(paths=[write_synthetic_corpus(root / "synthetic")], demo_corpus=False,
                       cache_dir=str(root / "index"))
    run["train"].update(max_steps=2)
    run["checkpoint"].update(dir=str(root / "ckpt"), save_interval=1000)
    run["metrics"].update(jsonl=str(root / "metrics.jsonl"), tensorboard_dir=None)
    task_file = root / "mc_local.jsonl"
    task_file.write_text("".join(json.dumps(item) + "\n" for item in _items()))
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(_task_yaml(task_file, root / "hf_datasets"))
    pool = get_pool(1)
    try:
        assert pool.run(train_run, run) == [EXIT_OK]
        yield {"ckpt": run["checkpoint"]["dir"], "task_file": str(task_file), "tasks_dir": str(root / "tasks"),
               "pool": pool}
    finally:
        pool.close()


# --- run on the pool's rank (module-level: the pool imports them by name) --------------------------

def _offline() -> None:
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")


def _lm_eval_and_ours(ckpt: str, task_file: str, tasks_dir: str) -> dict:
    """lm-eval's results and per-request log-likelihoods, and ours from the evaluator's own requests."""
    _offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from olmoe_megatron.evaluation.checkpoint_eval import evaluate_checkpoint
    from olmoe_megatron.evaluation.lm_eval_plugin import register

    register()
    result = lm_eval.simple_evaluate(model="olmoe_megatron", model_args=f"ckpt={ckpt}", tasks=[TASK],
                                     task_manager=TaskManager(include_path=tasks_dir, include_defaults=False),
                                     log_samples=True)
    samples = sorted(result["samples"][TASK], key=lambda sample: sample["doc_id"])
    ours = evaluate_checkpoint(ckpt, [f"--eval.tasks=[{task_file}]"])
    return {"acc": result["results"][TASK]["acc,none"], "acc_norm": result["results"][TASK]["acc_norm,none"],
            "logliks": [resp[0][0] for sample in samples for resp in sample["resps"]],
            "model_info": {key: result["config"][key] for key in ("checkpoint", "step", "max_length")},
            "our_metrics": ours["metrics"], "our_logliks": _evaluator_logliks(ckpt, task_file)}


def _evaluator_logliks(ckpt: str, task_file: str) -> list[float]:
    """The in-loop evaluator's log-likelihoods: its requests, micro-batch and max_length, `olmoe eval`'s loading."""
    from olmoe_megatron.checkpoint.weights import load_model
    from olmoe_megatron.evaluation.checkpoint_eval import checkpoint_run_config
    from olmoe_megatron.evaluation.evaluator import Evaluator, pad_multiple
    from olmoe_megatron.evaluation.forward import evaluation_mode
    from olmoe_megatron.evaluation.scoring import choice_logliks
    from olmoe_megatron.model.build import build_model_chunks
    from olmoe_megatron.parallel.context import initialize

    step_dir, run = checkpoint_run_config(ckpt, [f"--eval.tasks=[{task_file}]"])
    context = initialize(run.parallel, run.model, seed=run.train.seed)
    chunks = build_model_chunks(run.model, context, precision=run.precision)
    load_model(chunks, step_dir)
    evaluator = Evaluator.build(run, context)
    with evaluation_mode(chunks):
        return choice_logliks(chunks, evaluator.tasks[0].requests, context, micro_batch_size=evaluator.micro_batch_size,
                              max_length=evaluator.max_length, pad_multiple=pad_multiple(context)).tolist()


def _generation_and_rolling(ckpt: str) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from olmoe_megatron.evaluation.lm_eval_plugin import register

    register()
    lm = get_model("olmoe_megatron").create_from_arg_string(f"ckpt={ckpt},max_gen_toks=6", {"batch_size": 2})
    contexts = ["The cat sat on the", "Over the river and the tree the dog ran"]

    def generate(until):
        forwards = []
        hook = lm._models[0].register_forward_hook(lambda *_: forwards.append(1))
        try:
            requests = [Instance("generate_until", {}, (c, {"until": until, "max_gen_toks": 6}), 0) for c in contexts]
            return lm.generate_until(requests), len(forwards)
        finally:
            hook.remove()

    free, free_forwards = generate([])
    again, _ = generate([])
    stops = [text[1:3] for text in free]  # complete within each row's first tokens
    stopped, stopped_forwards = generate(stops)
    # is_greedy on the generated ids (decoding and encoding again need not give them back).
    context_ids = [lm.tok_encode(c) for c in contexts]
    ids = lm.greedy_tokens(context_ids, max_gen_toks=6)
    greedy = lm._loglikelihood_tokens([(None, c, g) for c, g in zip(context_ids, ids)])
    changed = ids[0][:-1] + [(ids[0][-1] + 1) % 50000]
    not_greedy = lm._loglikelihood_tokens([(None, context_ids[0], changed)])

    short = "The dog sat on the mat."
    long_text = " ".join(WORDS * 4)
    text_ids = lm.tok_encode(long_text)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)
                                        for text in (short, long_text)])
    empty_context = lm.loglikelihood([Instance("loglikelihood", {}, ("", short), 0)])[0][0]
    # lm-eval's disjoint windows of max_length=32 (context_len 1) for this text, written out.
    windows = [(None, [lm.eot_token_id], text_ids[:32]), (None, text_ids[31:32], text_ids[32:64]),
               (None, text_ids[len(text_ids) - 33:64], text_ids[64:])]
    return {"free": free, "again": again, "stops": stops, "stopped": stopped, "free_forwards": free_forwards,
            "stopped_forwards": stopped_forwards, "decoded": [lm.tok_decode(g) for g in ids],
            "greedy": [g for _, g in greedy], "not_greedy": not_greedy[0][1],
            "num_ids": len(text_ids), "rolling": rolling, "empty_context": empty_context,
            "windows": sum(ll for ll, _ in lm._loglikelihood_tokens(windows))}


def _bad_model_args(ckpt: str) -> list[str]:
    from lm_eval.api.registry import get_model, model_registry

    from olmoe_megatron.config import ConfigError
    from olmoe_megatron.evaluation.lm_eval_plugin import register

    register()
    messages = ["hf" in model_registry]  # lm-eval's own models stay registered next to ours
    for args in ("tokenizer=olmoe", f"ckpt={ckpt},max_lenght=64", f"ckpt={ckpt},max_length=100",
                 f"ckpt={ckpt},overrides=--parallel.pipeline_parallel=2;--eval.task_limit=3"):
        try:
            get_model("olmoe_megatron").create_from_arg_string(args, {"batch_size": None, "device": "cpu"})
            messages.append("no error")
        except ConfigError as exc:
            messages.append(str(exc))
    return messages


# --- tests -------------------------------------------------------------------------------------------

def test_lm_eval_scores_a_local_task_exactly_as_our_evaluator(setup):
    result = setup["pool"].run(_lm_eval_and_ours, setup["ckpt"], setup["task_file"], setup["tasks_dir"])[0]
    assert len(result["logliks"]) == sum(len(item["choices"]) for item in _items()) == 42
    assert result["logliks"] == result["our_logliks"]  # bit-identical: the same scorer on the same tokens
    assert result["acc"] == result["our_metrics"]["eval/mc_local/acc"]
    assert result["acc_norm"] == result["our_metrics"]["eval/mc_local/acc_norm"]
    assert result["model_info"] == {"checkpoint": str(Path(setup["ckpt"]) / "step_0000002"), "step": 2,
                                    "max_length": 32}


def test_greedy_generation_and_rolling_loglikelihood(setup):
    result = setup["pool"].run(_generation_and_rolling, setup["ckpt"])[0]
    assert result["free"] == result["again"] and all(result["free"])  # deterministic, non-empty
    expected = []
    for text in result["free"]:
        for stop in result["stops"]:
            text = text.split(stop)[0]
        expected.append(text)
    assert all(len(stop) == 2 for stop in result["stops"]) and result["stopped"] == expected
    assert result["free_forwards"] == 6 > result["stopped_forwards"]  # one pass per token; the stops end it early
    assert result["decoded"] == result["free"]
    assert result["greedy"] == [True, True] and result["not_greedy"] is False
    assert 64 < result["num_ids"] <= 96  # three windows
    short, long_text = result["rolling"]
    assert short == result["empty_context"]
    assert long_text == pytest.approx(result["windows"], rel=1e-6)  # other micro-batches: fp32 sums differ a little


def test_bad_model_args_are_clear_errors(setup):
    registered, missing, unknown, length, layout = setup["pool"].run(_bad_model_args, setup["ckpt"])[0]
    assert registered is True
    assert "ckpt is required" in missing and "--model_args ckpt=DIR" in missing
    assert "max_lenght" in unknown and "max_length" in unknown
    assert "max_length=100 must be a multiple of 8" in length and "try 96" in length
    assert "got tp=1 pp=2 cp=1" in layout and "--parallel.*" in layout
