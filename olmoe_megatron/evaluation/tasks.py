"""Ranked-classification (multiple-choice) tasks: the JSONL format, lm-eval's token pairing, accuracy.

A task file has one JSON object per line::

    {"id": "q1", "context": "The sky is", "choices": [" blue", " green"], "label": 0}

`id` is a string or an integer (unique in the file), `context` a string, `choices` at least two
non-empty strings and `label` the index of the right choice. No other keys are allowed; blank lines
are skipped.

Convention: the scored continuation is the choice appended directly to the context
(`context + choice`), so choices carry their own leading space where the layout needs one. This is
lm-evaluation-harness's `context + target_delimiter + choice` with the delimiter (" " by default)
already in the choice: the converters in `task_formats.py` write it there. Accordingly `acc_norm`
divides by the choice's length without that one leading space, which is what lm-eval divides by.

Tokens are paired exactly as lm-eval 0.4's `TemplateLM.loglikelihood` does for causal models:
trailing whitespace of the context moves to the continuation, the whole text is encoded once, and
the continuation's tokens are what follows the context's own encoding (`encode_pair`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from olmoe_megatron.config import ConfigError
from olmoe_megatron.data.corpus import DEFAULT_DEMO_BYTES, DEFAULT_HELDOUT_BYTES, stdlib_heldout_files, stdlib_root
from olmoe_megatron.data.fileutil import atomic_path
from olmoe_megatron.evaluation.config import BUILTIN_TASKS

logger = logging.getLogger(__name__)

TASK_KEYS = ("id", "context", "choices", "label")
_EXAMPLE = '{"id": "q1", "context": "The sky is", "choices": [" blue", " green"], "label": 0}'
_SHOW_CHARS = 80

# demo-next-line: context lines before the line to continue, distractors, shortest usable line.
_DEMO_CONTEXT_LINES = 4
_DEMO_DISTRACTORS = 3
_DEMO_MIN_CHARS = 8


class TaskFormatError(ConfigError):
    """A task file or record breaks the format: the message names file:line, the field, the value and the fix."""


@dataclasses.dataclass(frozen=True)
class TaskItem:
    """One multiple-choice item: the model scores `context + choice` for every choice."""

    id: str
    """Unique within its task (integer ids are kept as their decimal string)."""
    context: str
    """The conditioning text ("" conditions on the end-of-text token alone)."""
    choices: tuple[str, ...]
    """The continuations, each with its own leading space where the layout needs one."""
    label: int
    """Index of the right choice."""


def short_repr(value: object) -> str:
    """repr of a value, cut short for error messages."""
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS - 3] + "..."


def parse_item(record: object, *, where: str) -> TaskItem:
    """Validates one task record and returns its item.

    Args:
        record: The decoded JSON value of one line.
        where: Its place, `file:line`, for error messages.

    Raises:
        TaskFormatError: The record breaks the format (the message says which field and how to fix it).
    """
    if not isinstance(record, dict):
        hint = " (a JSON array: write one object per line instead)" if isinstance(record, list) else ""
        raise TaskFormatError(f"{where}: a task line must be a JSON object like {_EXAMPLE}, "
                              f"got {type(record).__name__} {short_repr(record)}{hint}")
    unknown = sorted(set(record) - set(TASK_KEYS))
    if unknown:
        raise TaskFormatError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a task line has exactly "
                              f"the keys {', '.join(TASK_KEYS)}: drop or rename the others")
    missing = [key for key in TASK_KEYS if key not in record]
    if missing:
        raise TaskFormatError(f"{where}: field {missing[0]!r} is missing; every line needs "
                              f"{', '.join(TASK_KEYS)}, e.g. {_EXAMPLE}")
    item_id, context, choices, label = (record[key] for key in TASK_KEYS)
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or item_id == "":
        raise TaskFormatError(f"{where}: field 'id'={short_repr(item_id)} must be a non-empty string or an integer "
                              "unique in the file")
    if not isinstance(context, str):
        raise TaskFormatError(f"{where}: field 'context'={short_repr(context)} must be a string "
                              "(the text the choices follow)")
    if not isinstance(choices, list) or len(choices) < 2:
        raise TaskFormatError(f"{where}: field 'choices'={short_repr(choices)} must be a list of at least 2 strings, "
                              'e.g. [" blue", " green"]')
    for index, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise TaskFormatError(f"{where}: field 'choices[{index}]'={short_repr(choice)} must be a non-empty string "
                                  '(the text scored after the context, with its own leading space, e.g. " blue")')
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise TaskFormatError(f"{where}: field 'label'={short_repr(label)} must be an integer index into choices, "
                              f"in [0, {len(choices)}) for these {len(choices)} choices (0 is the first)")
    return TaskItem(id=str(item_id), context=context, choices=tuple(choices), label=label)


def check_unique_ids(items: Sequence[TaskItem], places: Sequence[str]) -> None:
    """Raises TaskFormatError naming both places when two items share an id."""
    seen: dict[str, str] = {}
    for item, place in zip(items, places, strict=True):
        if item.id in seen:
            raise TaskFormatError(f"{place}: field 'id'={item.id!r} is a duplicate of the item at {seen[item.id]}; "
                                  "give each item its own id")
        seen[item.id] = place


def read_task(path: str | os.PathLike) -> list[TaskItem]:
    """Reads and validates a task JSONL file.

    Raises:
        TaskFormatError: A line is not valid JSON or breaks the format, two ids repeat, or the file has no items.
    """
    items, places = [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TaskFormatError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start}); "
                                      "save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TaskFormatError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}) in "
                                      f"{short_repr(text.rstrip())}; each line must be one object like {_EXAMPLE}") from None
            items.append(parse_item(record, where=where))
            places.append(where)
    if not items:
        raise TaskFormatError(f"{path}: has no items; a task file needs one JSON object per line like {_EXAMPLE}")
    check_unique_ids(items, places)
    return items


def write_task(items: Iterable[TaskItem], path: str | os.PathLike) -> int:
    """Writes items as task JSONL, atomically (a reader never sees half a file). Returns the count."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for item in items:
            record = {"id": item.id, "context": item.context, "choices": list(item.choices), "label": item.label}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str, *,
                prefix_token_id: int) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, paired exactly as lm-eval's `TemplateLM.loglikelihood`.

    Args:
        encode: Text -> token ids, adding no special tokens (like lm-eval's causal HF models
            without add_bos_token).
        context: The conditioning text.
        continuation: The scored text.
        prefix_token_id: Conditions an empty context (lm-eval uses the end-of-text token): the
            context is [prefix_token_id], unless the continuation already starts with it.

    Returns:
        (context_ids, continuation_ids); the model scores continuation_ids after context_ids.
    """
    if context == "":
        continuation_ids = encode(continuation)
        if continuation_ids[0] != prefix_token_id:
            return [prefix_token_id], continuation_ids
        return continuation_ids[:1], continuation_ids[1:]
    num_spaces = len(context) - len(context.rstrip())
    if num_spaces > 0:
        continuation = context[-num_spaces:] + continuation
        context = context[:-num_spaces]
    whole_ids = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole_ids[len(context_ids):]


def task_requests(items: Sequence[TaskItem], encode: Callable[[str], list[int]], *,
                  prefix_token_id: int) -> list[tuple[list[int], list[int]]]:
    """One (context_ids, continuation_ids) request per (item, choice), item-major (see `encode_pair`)."""
    return [encode_pair(encode, item.context, choice, prefix_token_id=prefix_token_id)
            for item in items for choice in item.choices]


def _norm_length(choice: str) -> float:
    """lm-eval's acc_norm length: the choice's characters without the target delimiter " "."""
    return float(len(choice.removeprefix(" ")))


def choice_accuracy(items: Sequence[TaskItem], logliks: Sequence[float]) -> dict[str, float | int]:
    """Accuracy of picking the most likely choice, as lm-eval's multiple_choice `acc` and `acc_norm`.

    Args:
        items: The scored items.
        logliks: Summed continuation log-likelihood of every (item, choice), in `task_requests` order.

    Returns:
        {"acc": share of items whose highest log-likelihood is the label's (first maximum wins),
        "acc_norm": the same with log-likelihood divided by the choice's length in characters,
        "num_items": len(items)}.
    """
    num_requests = sum(len(item.choices) for item in items)
    if len(logliks) != num_requests or not items:
        raise ValueError(f"choice_accuracy: {len(logliks)} log-likelihoods for {len(items)} items with "
                         f"{num_requests} choices; want one per choice, and at least one item")
    correct = correct_norm = 0
    offset = 0
    for item in items:
        lls = np.asarray(logliks[offset:offset + len(item.choices)], dtype=np.float64)
        offset += len(item.choices)
        lengths = np.array([_norm_length(choice) for choice in item.choices])
        correct += int(np.argmax(lls)) == item.label
        with np.errstate(divide="ignore", invalid="ignore"):  # a " " choice has length 0, as in lm-eval
            correct_norm += int(np.argmax(lls / lengths)) == item.label
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "num_items": len(items)}


def _usable(line: str) -> bool:
    return len(line.strip()) >= _DEMO_MIN_CHARS


def demo_next_line_items(*, max_bytes: int = DEFAULT_DEMO_BYTES, heldout_bytes: int = DEFAULT_HELDOUT_BYTES,
                         num_items: int = 400, seed: int = 0) -> list[TaskItem]:
    """The built-in demo-next-line task, from the demo corpus's held-out standard-library files.

    Each item's context is a line and up to 4 lines before it in the same file (each ending in
    "\\n"); the choices are the true next line and 3 other held-out lines, shuffled. The line
    ending the context and every choice have at least 8 non-space characters, and the choices
    differ from each other once stripped. Deterministic for given arguments and interpreter.

    Args:
        max_bytes: The demo corpus's size (data.demo_max_bytes): the text comes after it.
        heldout_bytes: Bytes of held-out files to draw from.
        num_items: Items to make (fewer if the files have fewer usable lines).
        seed: Seed of the numpy Generator that picks the items, the distractors and the order.

    Raises:
        TaskFormatError: The held-out files give no item.
    """
    root = stdlib_root()
    files = [(path.relative_to(root).as_posix(), path.read_text(encoding="utf-8", errors="replace").split("\n"))
             for path in stdlib_heldout_files(max_bytes, heldout_bytes)]
    files = [(name, [line + "\n" for line in (lines[:-1] if lines[-1] == "" else lines)]) for name, lines in files]
    positions = [(name, lines, i) for name, lines in files for i in range(len(lines) - 1)
                 if _usable(lines[i]) and _usable(lines[i + 1])]
    pool = [line for _, lines in files for line in lines if _usable(line)]
    if not positions or len({line.strip() for line in pool}) <= _DEMO_DISTRACTORS:
        raise TaskFormatError(f"demo-next-line: the held-out files after max_bytes={max_bytes} ({len(files)} files, "
                              f"heldout_bytes={heldout_bytes}) give no items; lower data.demo_max_bytes or "
                              "raise heldout_bytes")
    rng = np.random.default_rng(seed)
    items = []
    for index in rng.permutation(len(positions))[:num_items]:
        name, lines, i = positions[index]
        true_line = lines[i + 1]
        choices, seen = [true_line], {true_line.strip()}
        while len(choices) < 1 + _DEMO_DISTRACTORS:
            candidate = pool[int(rng.integers(len(pool)))]
            if candidate.strip() not in seen:
                choices.append(candidate)
                seen.add(candidate.strip())
        order = rng.permutation(len(choices))
        items.append(TaskItem(id=f"{name}:{i + 2}", context="".join(lines[max(0, i - _DEMO_CONTEXT_LINES):i + 1]),
                              choices=tuple(choices[j] for j in order), label=int(np.flatnonzero(order == 0)[0])))
    return items


def load_task(spec: str, *, limit: int | None = None,
              demo_max_bytes: int = DEFAULT_DEMO_BYTES) -> tuple[str, list[TaskItem]]:
    """A task's name and items, from a JSONL path (named by its stem) or a built-in name.

    Args:
        spec: A task file path or one of BUILTIN_TASKS.
        limit: Keep only the first this many items (None: all).
        demo_max_bytes: For demo-next-line: the demo corpus's size (data.demo_max_bytes), which the
            task's text comes after.

    Raises:
        TaskFormatError: The file is missing or bad, or limit < 1.
    """
    if limit is not None and limit < 1:
        raise TaskFormatError(f"task limit={limit} must be >= 1 (None: every item)")
    if spec in BUILTIN_TASKS:
        name, items = spec, demo_next_line_items(max_bytes=demo_max_bytes)
    elif not Path(spec).is_file():
        raise TaskFormatError(f"eval.tasks: task file {spec} does not exist; give a .jsonl task file (convert a "
                              f"public layout with `olmoe prep mc-task`) or a built-in task ({', '.join(BUILTIN_TASKS)})")
    else:
        name, items = Path(spec).stem, read_task(spec)
    items = items if limit is None else items[:limit]
    logger.info("task %s: %d items", name, len(items))
    return name, items
