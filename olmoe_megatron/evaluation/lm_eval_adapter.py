"""lm-evaluation-harness model `olmoe_megatron`: our checkpoints scored by our code, no HF export.

    olmoe lm-eval --model olmoe_megatron --model_args ckpt=runs/demo/checkpoints --tasks hellaswag
    olmoe-lm-eval --model olmoe_megatron --model_args 'ckpt=DIR,overrides=--precision.dtype=bf16' \\
        --tasks my_task --include_path my_tasks/

model_args: `ckpt` (required: a checkpoint root or step directory), `tokenizer` (default the
run's data.tokenizer), `max_length` (default the run's train.seq_length rounded down to a length
every layout accepts), `micro_batch_size` (default lm-eval's numeric --batch_size, else the run's
eval.micro_batch_size or train.micro_batch_size), `max_gen_toks` (256), `overrides` (dotted
`--section.field=value` settings separated by ';', applied like `olmoe eval`'s).

Log-likelihoods come from `choice_logliks`, the in-loop evaluator's scorer, so a task's acc and
acc_norm equal `olmoe eval`'s on the same items. `is_greedy` and `generate_until` (greedy, without
a KV cache: every new token recomputes the window) take the logits of a plain forward pass, so the
layout must not split a sequence or the vocabulary: tensor, pipeline and context parallel sizes 1.
One process by default; ranks of a torchrun/srun job all score every request together (data or
expert parallel), and lm-eval reports from LOCAL_RANK 0.

A task file of ours (`tasks.py`) reads in lm-eval as a local `dataset_path: json` task with
`output_type: multiple_choice`, `doc_to_text: "{{context}}"`, `doc_to_target: "{{label}}"`,
`target_delimiter: " "` and `doc_to_choice: "{{choices | map('regex_replace', '^ ', '') | list}}"`:
the choices' leading space becomes lm-eval's delimiter, so the scored text is the same and
lm-eval's acc_norm divides by the length ours does (tests/evaluation/test_lm_eval_adapter.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lm_eval.models  # noqa: F401 - lm-eval's own models: its get_model imports them only into an empty registry
import numpy as np
import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from olmoe_megatron.config import ConfigError
from olmoe_megatron.evaluation.evaluator import pad_multiple, run_tokenizer
from olmoe_megatron.evaluation.forward import evaluation_mode
from olmoe_megatron.evaluation.lm_eval_plugin import MODEL_NAME
from olmoe_megatron.evaluation.scoring import choice_logliks, request_batch

logger = logging.getLogger(__name__)

Pair = tuple[list[int], list[int]]
"""(context_ids, continuation_ids): a continuation scored after its context."""

_DEFAULT_MAX_GEN_TOKS = 256
# What lm-eval's simple_evaluate hands every model besides model_args; here the device follows
# the torch.distributed backend (NCCL: this rank's GPU) and batches are micro_batch_size.
_LM_EVAL_ARGS = ("max_batch_size", "device", "trust_remote_code")
_GREEDY_KEYS = ("until", "max_gen_toks", "do_sample", "temperature")


def load_chunks(step_dir: Path, run, context) -> list[torch.nn.Module]:
    """This rank's model chunks with the weights of `step_dir`, as `evaluate_checkpoint` builds them.

    Args:
        step_dir: A step directory (from `checkpoint_run_config`).
        run: Its RunConfig, with any overrides applied.
        context: The ParallelContext of `run.parallel` (from `olmoe_megatron.parallel.context.initialize`).
    """
    from olmoe_megatron.checkpoint.weights import load_model
    from olmoe_megatron.model.build import build_model_chunks, build_transformer_config

    config, _ = build_transformer_config(run.model, context, precision=run.precision)
    chunks = build_model_chunks(run.model, context, precision=run.precision, config=config)
    load_model(chunks, step_dir)
    return chunks


def _override_list(overrides: str | Sequence[str] | None) -> list[str]:
    if overrides is None or overrides == "":
        return []
    if isinstance(overrides, str):
        return [part.strip() for part in overrides.split(";") if part.strip()]
    if isinstance(overrides, (list, tuple)) and all(isinstance(part, str) for part in overrides):
        return list(overrides)
    raise ConfigError(f"model_args overrides={overrides!r} must be dotted settings separated by ';', e.g. "
                      "overrides='--eval.micro_batch_size=4;--precision.dtype=bf16'")


def _positive_int(label: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() or int(value) < 1:
        raise ConfigError(f"{label}={value!r} must be a positive integer")
    return int(value)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@register_model(MODEL_NAME)
class OlmoeMegatronLM(TemplateLM):
    """lm-eval's TemplateLM over a checkpoint of ours, loaded with our model code."""

    def __init__(self, ckpt: str | None = None, *, tokenizer: str | None = None, max_length: int | None = None,
                 micro_batch_size: int | None = None, max_gen_toks: int = _DEFAULT_MAX_GEN_TOKS,
                 overrides: str | Sequence[str] | None = None, batch_size: int | str | None = None,
                 **lm_eval_args) -> None:
        """Loads the checkpoint (collective: every rank of the job constructs the model together).

        Args:
            ckpt: Checkpoint root or step directory (required).
            tokenizer: data.tokenizer for the run (`olmoe`, `demo-bpe-N` or a tokenizer.json);
                default the checkpoint run's.
            max_length: Longest window scored or attended to, a multiple of `pad_multiple`
                (8 on one process); default train.seq_length rounded down to one.
            micro_batch_size: Sequences per forward pass; default a numeric `batch_size`, else
                eval.micro_batch_size or train.micro_batch_size of the run.
            max_gen_toks: Tokens generated when a request's gen_kwargs give no max_gen_toks.
            overrides: `--section.field=value` settings separated by ';' (or a list of them).
            batch_size: lm-eval's --batch_size ('auto' is not supported: the run's is used).
            **lm_eval_args: What lm-eval passes every model (max_batch_size, device,
                trust_remote_code); ignored.

        Raises:
            ConfigError: ckpt is missing, a model_arg is unknown or bad, or the layout splits
                sequences or the vocabulary.
        """
        super().__init__()
        unknown = sorted(set(lm_eval_args) - set(_LM_EVAL_ARGS))
        if unknown:
            raise ConfigError(f"model_args {', '.join(unknown)}: unknown to --model {MODEL_NAME}; it takes ckpt, "
                              "tokenizer, max_length, micro_batch_size, max_gen_toks and overrides")
        if not ckpt:
            raise ConfigError(f"model_args ckpt is required: --model {MODEL_NAME} --model_args ckpt=DIR (a checkpoint "
                              "root with `latest`, or a step directory)")
        from olmoe_megatron.evaluation.checkpoint_eval import checkpoint_run_config
        from olmoe_megatron.parallel.context import initialize

        flags = _override_list(overrides) + ([f"--data.tokenizer={tokenizer}"] if tokenizer else [])
        self._step_dir, self._run = step_dir, run = checkpoint_run_config(ckpt, flags)
        layout = run.parallel
        if (layout.tp, layout.pp, layout.cp) != (1, 1, 1):
            raise ConfigError(f"--model {MODEL_NAME} runs with parallel tensor/pipeline/context sizes 1 (its greedy "
                              f"decoding reads whole logits on every rank); got tp={layout.tp} pp={layout.pp} "
                              f"cp={layout.cp}: drop those --parallel.* overrides (data and expert parallel work)")
        self._context = context = initialize(layout, run.model, seed=run.train.seed,
                                             timeout_minutes=run.train.collective_timeout_minutes)
        layout.validate(run.model, context.world_size, backend=context.backend)
        self._device = context.device
        self._pad_multiple = pad_multiple(context)
        self._max_length = self._resolve_max_length(max_length, run)
        self._micro_batch_size = self._resolve_micro_batch_size(micro_batch_size, batch_size, run)
        self._max_gen_toks = _positive_int("model_args max_gen_toks", max_gen_toks)
        self._ignored_gen_kwargs: set[str] = set()  # warned about once
        self._tokenizer = run_tokenizer(run.data)
        self._eot_token_id = int(run.data.eos_token_id)
        self._vocab_size = int(run.model.vocab_size)
        if self._tokenizer.get_vocab_size() > self._vocab_size:
            raise ConfigError(f"model_args tokenizer: data.tokenizer={run.data.tokenizer!r} has "
                              f"{self._tokenizer.get_vocab_size()} tokens, more than the model's vocab_size "
                              f"{self._vocab_size}; evaluate with the tokenizer the model was trained with")
        self._models = load_chunks(step_dir, run, context)
        logger.info("lm-eval model %s: %s (%s), max_length %d, micro-batch %d", MODEL_NAME, step_dir,
                    layout.describe(context.world_size), self._max_length, self._micro_batch_size)

    def _resolve_max_length(self, max_length, run) -> int:
        multiple = self._pad_multiple
        if max_length is None:
            value = run.train.seq_length // multiple * multiple
            if value < 1:
                raise ConfigError(f"train.seq_length={run.train.seq_length} is shorter than {multiple}; give "
                                  f"model_args max_length={multiple} or more")
            return value
        value = _positive_int("model_args max_length", max_length)
        if value % multiple:
            raise ConfigError(f"model_args max_length={value} must be a multiple of {multiple} (the lengths this "
                              f"layout accepts); try {max(multiple, value // multiple * multiple)}")
        if value > run.model.max_sequence_length:
            raise ConfigError(f"model_args max_length={value} exceeds model.max_sequence_length="
                              f"{run.model.max_sequence_length}; give at most that")
        return value

    @staticmethod
    def _resolve_micro_batch_size(micro_batch_size, batch_size, run) -> int:
        if micro_batch_size is not None:
            return _positive_int("model_args micro_batch_size", micro_batch_size)
        if batch_size is not None and str(batch_size).isdigit():
            return _positive_int("--batch_size", batch_size)
        if batch_size is not None:
            logger.info("batch_size=%s is not a number: micro-batches of the run's size", batch_size)
        return run.eval.micro_batch_size or run.train.micro_batch_size

    # TemplateLM's tokenizer interface -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot_token_id

    @property
    def prefix_token_id(self) -> int:
        """Conditions an empty context: the run's end-of-document id, as our evaluator uses."""
        return self._eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self._run.data.tokenizer)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`; no special tokens unless asked (as our evaluator encodes)."""
        return self._tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=True)

    def get_model_info(self) -> dict:
        """Recorded in lm-eval's results["config"]."""
        from olmoe_megatron.evaluation.checkpoint_eval import checkpoint_step

        return {"checkpoint": str(self._step_dir), "step": checkpoint_step(self._step_dir),
                "layout": self._run.parallel.describe(self._context.world_size),
                "precision": self._run.precision.dtype, "max_length": self._max_length,
                "micro_batch_size": self._micro_batch_size}

    # Scoring --------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(summed log-likelihood, whether greedy decoding gives the continuation) per request."""
        pairs = [(list(context_ids), list(continuation_ids)) for _, context_ids, continuation_ids in requests]
        logliks, greedy = self._score(pairs, with_greedy=True)
        results = list(zip(logliks.tolist(), greedy))
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over disjoint windows of max_length (lm-eval's rolling windows)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            token_windows = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)
            for context_ids, continuation_ids in map(lm_eval_utils.make_disjoint_window, token_windows):
                windows.append((list(context_ids), list(continuation_ids)))
                owners.append(index)
        logliks, _ = self._score(windows, with_greedy=False)
        totals = np.zeros(len(requests), dtype=np.float64)
        np.add.at(totals, np.asarray(owners, dtype=np.int64), logliks)
        for request, total in zip(requests, totals.tolist()):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals.tolist()

    def _score(self, pairs: list[Pair], *, with_greedy: bool) -> tuple[np.ndarray, list[bool]]:
        """Log-likelihoods from the in-loop scorer and (optionally) greedy flags from the logits.

        An empty continuation has log-likelihood 0 and counts as greedy (nothing to predict).
        """
        logliks = np.zeros(len(pairs), dtype=np.float64)
        greedy = [True] * len(pairs)
        scored = [i for i, (_, continuation_ids) in enumerate(pairs) if continuation_ids]
        if not scored:
            return logliks, greedy
        chosen = [pairs[i] for i in scored]
        with evaluation_mode(self._models):
            logliks[scored] = choice_logliks(self._models, chosen, self._context,
                                             micro_batch_size=self._micro_batch_size, max_length=self._max_length,
                                             pad_multiple=self._pad_multiple)
            flags = self._greedy_flags(chosen) if with_greedy else [True] * len(chosen)
        for i, flag in zip(scored, flags):
            greedy[i] = flag
        return logliks, greedy

    def _greedy_flags(self, pairs: list[Pair]) -> list[bool]:
        """Whether every continuation token is the argmax after its prefix (same windows as the scorer)."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        flags = [False] * len(pairs)
        for first in range(0, len(order), self._micro_batch_size):
            rows = order[first:first + self._micro_batch_size]
            longest = max(len(pairs[i][0]) + len(pairs[i][1]) - 1 for i in rows)
            length = min(self._max_length, _round_up(longest, self._pad_multiple))
            batch, spans = request_batch([pairs[i] for i in rows], max_length=self._max_length, length=length)
            predicted = self._logits(batch["tokens"]).argmax(dim=-1).cpu()
            for row, (request, (start, stop)) in enumerate(zip(rows, spans)):
                flags[request] = bool(torch.equal(predicted[row, start:stop], batch["labels"][row, start:stop]))
        return flags

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Float logits [batch, seq, vocab_size] of a right-padded batch (causal: padding is never seen)."""
        batch, length = tokens.shape
        device = self._context.device
        position_ids = torch.arange(length, dtype=torch.int64, device=device).unsqueeze(0).expand(batch, -1)
        logits = self._models[0](tokens.to(device), position_ids, None)  # no labels: [b, s, padded vocab]
        return logits[..., :self._vocab_size].float()

    # Generation -----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each stopped at its first `until` string, end of text or max_gen_toks."""
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            _, gen_kwargs = request.args
            groups.setdefault(self._generation_settings(gen_kwargs), []).append(index)
        texts = [""] * len(requests)
        for (until, max_gen_toks), indices in groups.items():
            contexts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in indices]
            for index, ids in zip(indices, self.greedy_tokens(contexts, until=until, max_gen_toks=max_gen_toks)):
                text = self.tok_decode(ids)
                for stop in until:
                    text = text.split(stop)[0]
                texts[index] = text
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _generation_settings(self, gen_kwargs: dict | None) -> tuple[tuple[str, ...], int]:
        """(until strings, max_gen_toks) of a request; sampling is refused (greedy only)."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else until
        if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ConfigError(f"gen_kwargs until={kwargs.get('until')!r} must be a string or a list of strings")
        if kwargs.get("do_sample"):
            raise ConfigError(f"gen_kwargs do_sample=True: --model {MODEL_NAME} decodes greedily only; set "
                              "do_sample=false (or drop it)")
        ignored = sorted(set(kwargs) - set(_GREEDY_KEYS))
        if set(ignored) - self._ignored_gen_kwargs:
            logger.warning("greedy decoding ignores gen_kwargs %s", ", ".join(ignored))
            self._ignored_gen_kwargs.update(ignored)
        max_gen_toks = _positive_int("gen_kwargs max_gen_toks", kwargs.get("max_gen_toks", self._max_gen_toks))
        return tuple(u for u in until if u), max_gen_toks

    def greedy_tokens(self, contexts: list[list[int]], *, until: Sequence[str] = (),
                      max_gen_toks: int) -> list[list[int]]:
        """The greedy token ids after each context, in micro-batches over the rows still going.

        A row stops before the end-of-text token, after the token whose decoded text first holds
        an `until` string (that token is kept), or after max_gen_toks tokens. Without a KV cache:
        every step reruns the last max_length tokens of each row.
        """
        generated: list[list[int]] = [[] for _ in contexts]
        active = list(range(len(contexts)))
        with evaluation_mode(self._models):
            for _ in range(max_gen_toks):
                if not active:
                    break
                still = []
                for first in range(0, len(active), self._micro_batch_size):
                    rows = active[first:first + self._micro_batch_size]
                    windows = [(contexts[i] + generated[i])[-self._max_length:] for i in rows]
                    for i, token in zip(rows, self._next_tokens(windows)):
                        if token == self.eot_token_id:
                            continue
                        generated[i].append(token)
                        if not any(stop in self.tok_decode(generated[i]) for stop in until):
                            still.append(i)
                active = still
        return generated

    def _next_tokens(self, windows: list[list[int]]) -> list[int]:
        """The argmax token after each window (right-padded to a length every layout accepts)."""
        length = min(self._max_length, _round_up(max(len(w) for w in windows), self._pad_multiple))
        tokens = torch.zeros((len(windows), length), dtype=torch.int64)
        for row, window in enumerate(windows):
            tokens[row, :len(window)] = torch.tensor(window, dtype=torch.int64)
        logits = self._logits(tokens)
        last = torch.tensor([len(w) - 1 for w in windows], device=logits.device)
        return logits[torch.arange(len(windows), device=logits.device), last].argmax(dim=-1).tolist()
