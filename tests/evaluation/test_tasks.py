"""Multiple-choice tasks: the JSONL format, lm-eval's token pairing and metrics, converters, demo-next-line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from olmoe_megatron.config import ConfigError
from olmoe_megatron.data.corpus import (
    build_demo_corpus,
    build_demo_heldout,
    stdlib_heldout_files,
    stdlib_root,
    stdlib_source_files,
)
from olmoe_megatron.data.errors import DataError
from olmoe_megatron.evaluation.task_formats import LAYOUTS, convert_task
from olmoe_megatron.evaluation.tasks import (
    TaskFormatError,
    TaskItem,
    choice_accuracy,
    demo_next_line_items,
    encode_pair,
    load_task,
    read_task,
    task_requests,
    write_task,
)
from olmoe_megatron.launcher.cli import main

EOS = "<|endoftext|>"
GOOD = {"id": "q1", "context": "The sky is", "choices": [" blue", " green"], "label": 0}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE (end-of-text id 0), trained in milliseconds."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The sky is blue. Question: what is 2+2?\nAnswer: 4\n", "hello world, def foo(x):\n    return x\n"] * 20
    tok.train_from_iterator(text, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return tok, str(path)


def _write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


# --- the format ------------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    items = [TaskItem(id="a", context="x", choices=(" y", " z"), label=1),
             TaskItem(id="7", context="", choices=("é\n", "two", "three"), label=2)]
    path = tmp_path / "t.jsonl"
    assert write_task(items, path) == 2
    assert read_task(path) == items
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temporary left behind
    assert read_task(_write_lines(tmp_path / "int_id.jsonl", [json.dumps({**GOOD, "id": 3}), ""]))[0].id == "3"


@pytest.mark.parametrize("line, field", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "label"}), "'label'"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "context"}), "'context'"),
    (json.dumps({**GOOD, "extra": 1}), "'extra'"),
    (json.dumps({**GOOD, "label": "0"}), "'label'"),
    (json.dumps({**GOOD, "label": True}), "'label'"),
    (json.dumps({**GOOD, "label": 2}), "'label'"),
    (json.dumps({**GOOD, "label": -1}), "'label'"),
    (json.dumps({**GOOD, "choices": [" blue"]}), "'choices'"),
    (json.dumps({**GOOD, "choices": " blue"}), "'choices'"),
    (json.dumps({**GOOD, "choices": [" blue", ""]}), "'choices[1]'"),
    (json.dumps({**GOOD, "choices": [" blue", 3]}), "'choices[1]'"),
    (json.dumps({**GOOD, "context": None}), "'context'"),
    (json.dumps({**GOOD, "id": True}), "'id'"),
    (json.dumps({**GOOD, "id": 1.5}), "'id'"),
])
def test_bad_line_names_file_line_and_field(tmp_path, line, field):
    path = _write_lines(tmp_path / "t.jsonl", [json.dumps({**GOOD, "id": "first"}), line])
    with pytest.raises(TaskFormatError) as info:
        read_task(path)
    assert f"{path}:2" in str(info.value) and field in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_duplicate_id_names_both_lines_and_empty_file(tmp_path):
    path = _write_lines(tmp_path / "t.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "id": "q2"}), json.dumps(GOOD)])
    with pytest.raises(TaskFormatError, match=rf"{path}:3: field 'id'='q1' is a duplicate of the item at {path}:1"):
        read_task(path)
    empty = _write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(TaskFormatError, match="has no items"):
        read_task(empty)


def test_load_task(tmp_path):
    path = _write_lines(tmp_path / "mine.jsonl", [json.dumps({**GOOD, "id": i}) for i in range(5)])
    name, items = load_task(path, limit=2)
    assert name == "mine" and [item.id for item in items] == ["0", "1"]
    with pytest.raises(TaskFormatError, match=r"missing\.jsonl does not exist.*olmoe prep mc-task"):
        load_task(str(tmp_path / "missing.jsonl"))
    name, items = load_task("demo-next-line", limit=3)
    assert name == "demo-next-line" and len(items) == 3


# --- token pairing and metrics, against lm-eval ---------------------------------------------------

def _lm_eval_stub(tokenizer):
    """A TemplateLM whose loglikelihood returns the token pairs lm-eval would score."""
    from lm_eval.api.model import TemplateLM

    class Stub(TemplateLM):
        eot_token_id = tokenizer.token_to_id(EOS)

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return tokenizer.encode(string).ids

        def _loglikelihood_tokens(self, requests, **kwargs):
            return [(context_enc, continuation_enc) for _, context_enc, continuation_enc in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return Stub()


PAIRS = [("The sky is", " blue"), ("Question: what is 2+2?\nAnswer: ", "4"), ("def foo(x):\n", "    return x\n"),
         ("hello wor", "ld"), ("caf\u00e9  ", "\u00e9t\u00e9"), ("", " blue"), ("", f"{EOS} hello"), ("x", " ")]


def test_encode_pair_equals_lm_eval(tokenizer):
    from lm_eval.api.instance import Instance

    tok, _ = tokenizer
    lm = _lm_eval_stub(tok)
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=0) for pair in PAIRS]
    expected = lm.loglikelihood(instances, disable_tqdm=True)
    encode = lambda text: tok.encode(text).ids  # noqa: E731
    ours = [encode_pair(encode, context, continuation, prefix_token_id=lm.prefix_token_id) for context, continuation in PAIRS]
    assert ours == [tuple(pair) for pair in expected]
    assert ours[-2][0] == [0]  # an empty context whose continuation starts with end-of-text keeps that token
    items = [TaskItem(id="a", context="The sky is", choices=(" blue", " green"), label=0)]
    assert task_requests(items, encode, prefix_token_id=0) == [encode_pair(encode, "The sky is", c, prefix_token_id=0)
                                                                for c in (" blue", " green")]


def test_choice_accuracy_matches_lm_eval_formulas():
    items = [TaskItem(id="a", context="c", choices=(" ab", " abcdef"), label=1),   # acc wrong, acc_norm right
             TaskItem(id="b", context="c", choices=(" x", " y", " z"), label=1),   # ties: the first maximum wins
             TaskItem(id="c", context="c", choices=("\n  one", "\n  three"), label=0)]
    logliks = [-2.0, -3.0, -1.0, -1.0, -5.0, -4.0, -9.0]
    result = choice_accuracy(items, logliks)
    # lm-eval: lls / len(choice), its choices having no target delimiter " " (ours carry it).
    gold_norm = [np.argmax(np.array([-2.0, -3.0]) / [2, 6]), np.argmax(np.array([-1.0, -1.0, -5.0]) / [1, 1, 1]),
                 np.argmax(np.array([-4.0, -9.0]) / [6, 8])]
    assert result == {"acc": 1 / 3, "acc_norm": sum(g == i.label for g, i in zip(gold_norm, items)) / 3, "num_items": 3}
    assert result["acc_norm"] == 2 / 3
    with pytest.raises(ValueError, match="6 log-likelihoods for 3 items with 7 choices"):
        choice_accuracy(items, logliks[:-1])


# --- converters ----------------------------------------------------------------------------------

HELLASWAG = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
             "ctx_b": "he starts pulling up roofing on a roof.", "ctx": "unused",
             "endings": ["is using wrap to wrap a pair of skis.", "starts [title] pulling  up roofing.",
                         "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"}
ARC = {"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster. Why?",
       "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer."],
                   "label": ["A", "B"]}, "answerKey": "B"}
ARC_ORIGINAL = {"id": "arc-2", "question": {"stem": "Which is a gas?", "choices": [
    {"text": "ice", "label": "1"}, {"text": "steam", "label": "2"}, {"text": "rock", "label": "3"}]}, "answerKey": "2"}
PIQA = {"goal": "How do I ready a guinea pig cage?", "sol1": "Put hay in it.", "sol2": "Put sand in it.", "label": 0}
MMLU = {"question": " What is 1+1? ", "subject": "high_school_mathematics", "choices": ["1", "2", "3", "4"], "answer": 1}


def _convert(tmp_path, layout, records, suffix=".jsonl"):
    source = tmp_path / f"{layout}{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), source)
    else:
        _write_lines(source, [json.dumps(r) for r in records])
    output = tmp_path / f"{layout}.out.jsonl"
    assert convert_task(layout, [str(source)], str(output)) == len(records)
    return read_task(output)


def test_hellaswag_converter(tmp_path):
    from lm_eval.tasks.hellaswag.utils import preprocess

    [item] = _convert(tmp_path, "hellaswag", [HELLASWAG], suffix=".parquet")
    assert item.context == "Roof shingle removal: A man is sitting on a roof. He starts pulling up roofing on a roof."
    assert item.choices[1] == " starts. pulling up roofing."
    assert item.id == "24" and item.label == 3
    ctx = HELLASWAG["ctx_a"] + " " + HELLASWAG["ctx_b"].capitalize()  # lm-eval's hellaswag process_docs
    assert item.context == preprocess(HELLASWAG["activity_label"] + ": " + ctx)
    assert item.choices == tuple(" " + preprocess(ending) for ending in HELLASWAG["endings"])


def test_arc_piqa_mmlu_converters_match_lm_eval_templates(tmp_path):
    from lm_eval.utils import apply_template

    arc = _convert(tmp_path, "arc", [ARC, ARC_ORIGINAL])
    assert arc[0].context == "Question: An astronomer observes that a planet rotates faster. Why?\nAnswer:"
    assert arc[0].context == apply_template("Question: {{question}}\nAnswer:", ARC)  # arc_easy.yaml doc_to_text
    assert arc[0].choices == (" Planetary density will decrease.", " Planetary years will become longer.")
    assert (arc[0].label, arc[0].id) == (1, "Mercury_7175875")
    assert (arc[1].context, arc[1].choices, arc[1].label) == ("Question: Which is a gas?\nAnswer:",
                                                              (" ice", " steam", " rock"), 1)
    [piqa] = _convert(tmp_path, "piqa", [PIQA], suffix=".parquet")
    assert piqa.context == apply_template("Question: {{goal}}\nAnswer:", PIQA)
    assert (piqa.choices, piqa.label, piqa.id) == ((" Put hay in it.", " Put sand in it."), 0, "piqa.parquet:row 0")
    [mmlu] = _convert(tmp_path, "mmlu", [MMLU])
    template = ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\n"
                "Answer:")  # mmlu/default/_default_template_yaml, after the subject's description
    description = "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
    assert mmlu.context == description + apply_template(template, MMLU)
    assert mmlu.context.endswith("What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert (mmlu.choices, mmlu.label, mmlu.id) == ((" A", " B", " C", " D"), 1, "mmlu.jsonl:1")


@pytest.mark.parametrize("layout, record, field", [
    ("hellaswag", {**HELLASWAG, "label": ""}, "'label'"),
    ("hellaswag", {k: v for k, v in HELLASWAG.items() if k != "ctx_b"}, "'ctx_b'"),
    ("hellaswag", {**HELLASWAG, "endings": "one"}, "'endings'"),
    ("arc", {**ARC, "answerKey": "E"}, "'answerKey'"),
    ("arc", {**ARC, "choices": [1, 2]}, "'choices'"),
    ("piqa", {**PIQA, "label": -1}, "'label'"),
    ("piqa", {**PIQA, "sol2": None}, "'sol2'"),
    ("mmlu", {**MMLU, "choices": ["1", "2"]}, "'choices'"),
    ("mmlu", {**MMLU, "answer": 4}, "'answer'"),
    ("mmlu", {k: v for k, v in MMLU.items() if k != "subject"}, "'subject'"),
])
def test_converter_bad_record_names_file_line_and_field(tmp_path, layout, record, field):
    good = {"hellaswag": HELLASWAG, "arc": ARC, "piqa": PIQA, "mmlu": MMLU}[layout]
    source = _write_lines(tmp_path / "in.jsonl", [json.dumps(good), json.dumps(record)])
    with pytest.raises(TaskFormatError) as info:
        convert_task(layout, [source], str(tmp_path / "out.jsonl"))
    assert f"{source}:2" in str(info.value) and field in str(info.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_convert_task_limit_layouts_and_duplicates(tmp_path):
    source = _write_lines(tmp_path / "p.jsonl", [json.dumps(PIQA)] * 3)
    assert convert_task("piqa", [source], str(tmp_path / "o.jsonl"), limit=2) == 2
    assert [item.id for item in read_task(tmp_path / "o.jsonl")] == ["p.jsonl:1", "p.jsonl:2"]
    with pytest.raises(TaskFormatError, match="choose one of hellaswag, arc, piqa, mmlu"):
        convert_task("winogrande", [source], str(tmp_path / "o.jsonl"))
    arc = _write_lines(tmp_path / "a.jsonl", [json.dumps(ARC)] * 2)
    with pytest.raises(TaskFormatError, match=rf"{arc}:2: field 'id'='Mercury_7175875' is a duplicate.*{arc}:1"):
        convert_task("arc", [arc], str(tmp_path / "o2.jsonl"))


def test_prep_mc_task_cli(tmp_path, capsys):
    source = _write_lines(tmp_path / "p.jsonl", [json.dumps(PIQA)] * 2)
    output = tmp_path / "piqa.jsonl"
    assert main(["prep", "mc-task", "--layout", "piqa", "--input", source, "--output", str(output)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 2 piqa items to {output}"
    assert load_task(str(output))[0] == "piqa"
    assert main(["prep", "mc-task", "--layout", "arc", "--input", source, "--output", str(output)]) == 2
    assert f"{source}:1: field 'question' is missing" in capsys.readouterr().err
    from olmoe_megatron.launcher.cli import build_parser

    mc = build_parser()._subparsers._group_actions[0].choices["prep"]._subparsers._group_actions[0].choices["mc-task"]
    assert next(a for a in mc._actions if a.dest == "layout").choices == tuple(LAYOUTS)


# --- demo held-out text and demo-next-line -------------------------------------------------------

def test_heldout_files_follow_the_corpus_and_never_overlap():
    corpus, heldout = stdlib_source_files(4_000_000), stdlib_heldout_files(4_000_000)
    assert heldout and not set(corpus) & set(heldout)
    rest = [p for p in stdlib_source_files(10**12)[len(corpus):]
            if p.relative_to(stdlib_root()).parts[0] != "encodings"]  # generated code-page tables
    assert rest[:len(heldout)] == heldout
    assert sum(path.stat().st_size for path in heldout[:-1]) < 400_000 <= sum(p.stat().st_size for p in heldout)
    assert stdlib_heldout_files(10**12) == []


def test_demo_next_line_items():
    items = demo_next_line_items(num_items=60)
    assert items == demo_next_line_items(num_items=60) and len(items) == 60
    assert items != demo_next_line_items(num_items=60, seed=1)
    assert len({item.id for item in items}) == 60
    heldout = {path.relative_to(stdlib_root()).as_posix() for path in stdlib_heldout_files(4_000_000)}
    for item in items:
        name, number = item.id.rsplit(":", 1)
        assert name in heldout
        lines = [line + "\n" for line in (stdlib_root() / name).read_text(encoding="utf-8").split("\n")]
        number = int(number)
        assert 0 <= item.label < len(item.choices) == 4
        assert item.choices[item.label] == lines[number - 1]  # the true next line sits at the label
        assert item.context == "".join(lines[max(0, number - 6):number - 1])
        assert len({choice.strip() for choice in item.choices}) == 4
        assert all(len(choice.strip()) >= 8 for choice in item.choices)
    assert len({item.label for item in items}) > 1


def test_build_demo_heldout(tmp_path, tokenizer):
    _, tokenizer_path = tokenizer
    corpus = build_demo_corpus(tmp_path, tokenizer_path=tokenizer_path, max_bytes=50_000)
    heldout = build_demo_heldout(tmp_path, tokenizer_path=tokenizer_path, max_bytes=50_000, heldout_bytes=20_000)
    assert heldout != corpus and heldout.name.startswith("stdlib-heldout-") and corpus.name.startswith("stdlib-")
    assert build_demo_heldout(tmp_path, tokenizer_path=tokenizer_path, max_bytes=50_000, heldout_bytes=20_000) == heldout
    texts = [json.loads(line)["path"] for line in (tmp_path / heldout.name.replace(".manifest.json", ".jsonl")).open()]
    assert texts == [path.name for path in stdlib_heldout_files(50_000, 20_000)]
    assert json.loads(heldout.read_text())["documents"] == len(texts)
    with pytest.raises(DataError, match="set data.demo_max_bytes <="):
        build_demo_heldout(tmp_path, tokenizer_path=tokenizer_path, max_bytes=10**12)
