"""Converters from public multiple-choice layouts to task JSONL, with lm-eval 0.4's zero-shot prompts.

Inputs are local files: JSON lines (.jsonl, .json) or parquet (.parquet, as Hugging Face datasets
ship them). Each record becomes one item whose context is lm-eval's `doc_to_text` (with its
`description` where the task has one) and whose choices are lm-eval's `doc_to_choice` with the
default target delimiter " " in front, so `context + choice` is exactly the text lm-eval scores:

- hellaswag (Rowan/hellaswag): context `preprocess(activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize())`, choices `" " + preprocess(ending)`, label `int(label)`.
- arc (allenai/ai2_arc, also the original ARC jsonl): context `"Question: {question}\\nAnswer:"`,
  choices `" " + text`, label the position of answerKey among the choice labels.
- piqa (baber/piqa): context `"Question: {goal}\\nAnswer:"`, choices `" " + sol1`, `" " + sol2`.
- mmlu (cais/mmlu): context `"The following are multiple choice questions (with answers) about
  {subject with spaces}.\\n\\n{question.strip()}\\nA. {choices[0]}\\nB. ...\\nD. {choices[3]}\\nAnswer:"`,
  choices " A", " B", " C", " D", label `answer`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from olmoe_megatron.evaluation.tasks import (
    TaskFormatError,
    TaskItem,
    check_unique_ids,
    parse_item,
    short_repr,
    write_task,
)

logger = logging.getLogger(__name__)

_DELIMITER = " "  # lm-eval's default target_delimiter
_MMLU_LETTERS = ("A", "B", "C", "D")


def _get(record: dict, key: str, kind: type | tuple[type, ...], *, where: str, layout: str) -> object:
    """record[key], checked to be of `kind` (bool never counts as int)."""
    if key not in record:
        raise TaskFormatError(f"{where}: field {key!r} is missing from this {layout} record (its keys: "
                              f"{', '.join(sorted(map(str, record)))}); is the input the {layout} layout?")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TaskFormatError(f"{where}: field {key!r}={short_repr(value)} must be a {names} in the {layout} layout")
    return value


def _strings(record: dict, key: str, *, where: str, layout: str, count: int | None = None) -> list[str]:
    """record[key] as a list of strings (of exactly `count` when given, else at least 2)."""
    values = _get(record, key, (list, tuple), where=where, layout=layout)
    if not all(isinstance(v, str) for v in values) or (len(values) != count if count else len(values) < 2):
        want = f"exactly {count}" if count else "at least 2"
        raise TaskFormatError(f"{where}: field {key!r}={short_repr(values)} must be a list of {want} strings "
                              f"in the {layout} layout")
    return list(values)


def _index_label(value: object, num_choices: int, *, key: str, where: str, layout: str) -> int:
    """An integer label (or its decimal string) in [0, num_choices)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_choices:
        unlabeled = " (test splits are often unlabeled: convert the validation split)" if value in ("", -1, None) else ""
        raise TaskFormatError(f"{where}: field {key!r}={short_repr(value)} must be an index in [0, {num_choices}) "
                              f"in the {layout} layout{unlabeled}")
    return value


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip, drop WikiHow's [title]/[step] markers, squeeze spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(record: dict, where: str) -> dict:
    get = lambda key: _get(record, key, str, where=where, layout="hellaswag")  # noqa: E731
    endings = _strings(record, "endings", where=where, layout="hellaswag")
    context = hellaswag_preprocess(get("activity_label") + ": " + get("ctx_a") + " " + get("ctx_b").capitalize())
    label = _index_label(record.get("label"), len(endings), key="label", where=where, layout="hellaswag")
    return {"id": record.get("ind"), "context": context,
            "choices": [_DELIMITER + hellaswag_preprocess(e) for e in endings], "label": label}


def _arc(record: dict, where: str) -> dict:
    question = record.get("question")
    if isinstance(question, dict):  # the original ARC jsonl: {"question": {"stem", "choices": [{text, label}]}}
        stem = _get(question, "stem", str, where=where, layout="arc")
        options = _get(question, "choices", list, where=where, layout="arc")
        if not all(isinstance(o, dict) for o in options):
            raise TaskFormatError(f"{where}: field 'question.choices'={short_repr(options)} must be a list of "
                                  "{text, label} objects in the original ARC layout")
        choices = {"text": [o.get("text") for o in options], "label": [o.get("label") for o in options]}
    else:
        stem = _get(record, "question", str, where=where, layout="arc")
        choices = _get(record, "choices", dict, where=where, layout="arc")
    texts = _strings(choices, "text", where=where, layout="arc")
    labels = [str(label) for label in _get(choices, "label", (list, tuple), where=where, layout="arc")]
    answer = str(_get(record, "answerKey", (str, int), where=where, layout="arc")).strip()
    if len(labels) != len(texts) or answer not in labels:
        raise TaskFormatError(f"{where}: field 'answerKey'={answer!r} must be one of the choice labels {labels} "
                              f"(one per choice text: {len(texts)}) in the arc layout")
    return {"id": record.get("id"), "context": f"Question: {stem}\nAnswer:",
            "choices": [_DELIMITER + text for text in texts], "label": labels.index(answer)}


def _piqa(record: dict, where: str) -> dict:
    get = lambda key: _get(record, key, str, where=where, layout="piqa")  # noqa: E731
    label = _index_label(record.get("label"), 2, key="label", where=where, layout="piqa")
    return {"id": record.get("id"), "context": f"Question: {get('goal')}\nAnswer:",
            "choices": [_DELIMITER + get("sol1"), _DELIMITER + get("sol2")], "label": label}


def _mmlu(record: dict, where: str) -> dict:
    question = _get(record, "question", str, where=where, layout="mmlu")
    subject = _get(record, "subject", str, where=where, layout="mmlu")
    choices = _strings(record, "choices", where=where, layout="mmlu", count=len(_MMLU_LETTERS))
    answer = record.get("answer")
    if isinstance(answer, str) and answer.strip() in _MMLU_LETTERS:
        answer = _MMLU_LETTERS.index(answer.strip())
    label = _index_label(answer, len(_MMLU_LETTERS), key="answer", where=where, layout="mmlu")
    description = f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(_MMLU_LETTERS, choices))
    return {"id": record.get("id"), "context": f"{description}{question.strip()}{options}\nAnswer:",
            "choices": [_DELIMITER + letter for letter in _MMLU_LETTERS], "label": label}


LAYOUTS: dict[str, Callable[[dict, str], dict]] = {"hellaswag": _hellaswag, "arc": _arc, "piqa": _piqa,
                                                     "mmlu": _mmlu}


def iter_records(path: str) -> Iterator[tuple[str, object]]:
    """(place, record) for every record of a JSON-lines or parquet file: place is the line number
    ("12") or the 0-based parquet row ("row 3"); errors name `path:place`."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        import pyarrow

        try:
            parquet = pq.ParquetFile(path)
        except pyarrow.ArrowException as exc:
            raise TaskFormatError(f"{path}: not a readable parquet file ({exc}); give a .parquet file as "
                                  "Hugging Face datasets ship them, or JSON lines") from None
        row = 0
        for batch in parquet.iter_batches():
            for record in batch.to_pylist():
                yield f"row {row}", record
                row += 1
    elif suffix in (".jsonl", ".json"):
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                    if line.strip():
                        yield str(number), json.loads(line)
                except UnicodeDecodeError as exc:
                    raise TaskFormatError(f"{path}:{number}: not UTF-8 ({exc.reason}); save the file as UTF-8") from None
                except json.JSONDecodeError as exc:
                    raise TaskFormatError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno}); "
                                          "inputs are JSON lines: one record object per line") from None
    else:
        raise TaskFormatError(f"{path}: unsupported input type {suffix or '(no suffix)'!r}; give JSON lines "
                              "(.jsonl, .json) or parquet (.parquet)")


def _converted(layout: str, inputs: list[str]) -> Iterator[tuple[str, TaskItem]]:
    """(file:place, item) for every record of `inputs`, in order."""
    for path in inputs:
        for place, record in iter_records(path):
            where = f"{path}:{place}"
            if not isinstance(record, dict):
                raise TaskFormatError(f"{where}: a {layout} record must be a JSON object, got "
                                      f"{type(record).__name__} {short_repr(record)}")
            converted = LAYOUTS[layout](record, where)
            if converted["id"] is None:  # layouts without ids: the record's place
                converted["id"] = f"{Path(path).name}:{place}"
            yield where, parse_item(converted, where=where)


def convert_task(layout: str, inputs: list[str], output: str | os.PathLike, *, limit: int | None = None) -> int:
    """Converts public-layout files to one task JSONL file and returns the number of items written.

    Args:
        layout: One of LAYOUTS (hellaswag, arc, piqa, mmlu).
        inputs: Local .jsonl/.json/.parquet files of that layout, read in order.
        output: The task JSONL to write (atomically).
        limit: Keep only the first this many items (None: all).

    Raises:
        TaskFormatError: Unknown layout, missing input, bad record (naming file:line and field) or no items.
    """
    if layout not in LAYOUTS:
        raise TaskFormatError(f"layout={layout!r} is not a known layout; choose one of {', '.join(LAYOUTS)}")
    if limit is not None and limit < 1:
        raise TaskFormatError(f"limit={limit} must be >= 1 (omit it to convert every record)")
    if not inputs:
        raise TaskFormatError("no input files; give at least one .jsonl/.json/.parquet file of the layout")
    for path in inputs:
        if not Path(path).is_file():
            raise TaskFormatError(f"input {path} does not exist; give a local .jsonl/.json/.parquet file")
    pairs = list(itertools.islice(_converted(layout, inputs), limit))
    places, items = [where for where, _ in pairs], [item for _, item in pairs]
    if not items:
        raise TaskFormatError(f"{', '.join(inputs)}: no records; the inputs hold no {layout} records")
    check_unique_ids(items, places)
    count = write_task(items, output)
    logger.info("wrote %d %s items to %s", count, layout, output)
    return count
