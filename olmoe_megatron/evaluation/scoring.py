"""Forward-only scoring in any layout: validation losses of fixed windows, log-likelihoods of choices.

Work is split over data-parallel ranks; every rank of the job runs the same number of forward
passes with the same shapes per pipeline (expert all-to-alls and pipeline sends stay matched) and
ends with the same values: sums are taken in float64 on the last pipeline stage and all-reduced
over the pipeline and data/context-parallel groups (tensor-parallel ranks already agree: the
vocab-parallel cross-entropy gives every one of them the full loss).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from olmoe_megatron.evaluation.forward import token_losses
from olmoe_megatron.evaluation.sources import EvalWindows
from olmoe_megatron.parallel.context import ParallelContext


def _micro_batch(tokens: np.ndarray, labels: np.ndarray, loss_mask: np.ndarray) -> dict[str, torch.Tensor]:
    batch, seq_length = tokens.shape
    return {"tokens": torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            "loss_mask": torch.from_numpy(np.ascontiguousarray(loss_mask, dtype=np.float32)),
            "position_ids": torch.arange(seq_length, dtype=torch.int64).unsqueeze(0).expand(batch, -1).contiguous()}


def _reduce_sum(values: torch.Tensor, context: ParallelContext) -> torch.Tensor:
    """Sum over the pipeline (only the last stage holds values) and the data/context-parallel ranks."""
    values = values.to(context.device)
    dist.all_reduce(values, group=context.groups.pp)
    dist.all_reduce(values, group=context.groups.dp_cp)
    return values.cpu()


def validation_loss(models: list[torch.nn.Module], windows: EvalWindows, context: ParallelContext, *,
                    micro_batch_size: int) -> dict[str, float]:
    """Token-weighted mean LM loss of `windows`, its perplexity and the tokens counted.

    The windows are padded (with masked copies) to a multiple of micro_batch_size x DP x PP (the
    interleaved schedule runs micro-batches in groups of PP) and split contiguously over the DP
    ranks; one schedule call runs this rank's micro-batches.
    """
    per_step = micro_batch_size * context.dp_size * context.layout.pp
    total = math.ceil(windows.num_windows / per_step) * per_step
    pad = total - windows.num_windows
    tokens = np.concatenate([windows.tokens, np.repeat(windows.tokens[:1], pad, axis=0)])
    labels = np.concatenate([windows.labels, np.repeat(windows.labels[:1], pad, axis=0)])
    loss_mask = np.concatenate([windows.loss_mask, np.zeros((pad, windows.loss_mask.shape[1]), np.float32)])
    per_rank = total // context.dp_size
    mine = slice(context.dp_rank * per_rank, (context.dp_rank + 1) * per_rank)
    tokens, labels, loss_mask = tokens[mine], labels[mine], loss_mask[mine]
    batches = [_micro_batch(tokens[i:i + micro_batch_size], labels[i:i + micro_batch_size],
                            loss_mask[i:i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]
    losses = token_losses(models, batches, context, seq_length=tokens.shape[1])
    sums = torch.zeros(2, dtype=torch.float64)
    for batch, loss in zip(batches, losses):
        mask = batch["loss_mask"].double()
        sums[0] += (loss.double() * mask).sum()
        sums[1] += mask.sum()
    total_loss, count = _reduce_sum(sums, context).tolist()
    loss = total_loss / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(count)}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def choice_logliks(models: list[torch.nn.Module], requests: list[tuple[list[int], list[int]]],
                   context: ParallelContext, *, micro_batch_size: int, max_length: int,
                   pad_multiple: int = 8) -> np.ndarray:
    """Summed log-likelihood (float64) of each request's continuation given its context.

    As lm-evaluation-harness scores: the input is (context + continuation)[-(max_length + 1):][:-1]
    and the continuation's tokens are the last ones predicted. Requests are sorted longest first
    into micro-batches padded on the right to the batch's longest (rounded up to `pad_multiple`);
    micro-batch j runs on DP rank j mod DP. A schedule call runs PP micro-batches of one length
    (the interleaved schedule needs groups of PP); ranks with fewer batches run discarded copies,
    so every rank runs the same passes.
    """
    if max_length % pad_multiple:
        raise ValueError(f"max_length={max_length} must be a multiple of pad_multiple={pad_multiple}")
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    batches = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    per_rank = [batches[rank::context.dp_size] for rank in range(context.dp_size)]
    group = context.layout.pp
    passes = math.ceil(len(per_rank[0]) / group) * group if batches else 0
    logliks = torch.zeros(len(requests), dtype=torch.float64)
    for first in range(0, passes, group):
        # One length for the whole group on every DP rank (an all-gather dispatcher needs equal shapes).
        in_group = [b for rank_batches in per_rank for b in rank_batches[first:first + group]]
        longest = max(len(requests[i][0]) + len(requests[i][1]) - 1 for b in in_group for i in b)
        length = min(max_length, _round_up(longest, pad_multiple))
        members = [per_rank[context.dp_rank][p] if p < len(per_rank[context.dp_rank]) else None
                   for p in range(first, first + group)]
        rows = [(m if m is not None else in_group[0]) for m in members]  # a discarded copy that fits the length
        rows = [row + [row[0]] * (micro_batch_size - len(row)) for row in rows]  # full micro-batches everywhere
        micro_batches, spans = zip(*(request_batch([requests[i] for i in row], max_length=max_length, length=length)
                                     for row in rows))
        losses = token_losses(models, list(micro_batches), context, seq_length=length)
        for member, row_spans, loss in zip(members, spans, losses):
            if member is None:
                continue
            loss = loss.double()
            for row, (request, (start, stop)) in enumerate(zip(member, row_spans)):
                logliks[request] = -loss[row, start:stop].sum()
    return _reduce_sum(logliks, context).numpy()


def request_batch(requests: list[tuple[list[int], list[int]]], *, max_length: int, length: int):
    """One micro-batch of requests and, per row, the label positions [start, stop) of its continuation."""
    sequences, spans = [], []
    for context_ids, continuation_ids in requests:
        if not continuation_ids:
            raise ValueError("a request has an empty continuation: nothing to score")
        whole = (list(context_ids) + list(continuation_ids))[-(max_length + 1):]
        num_inputs = len(whole) - 1
        scored = min(len(continuation_ids), num_inputs)
        sequences.append(whole)
        spans.append((num_inputs - scored, num_inputs))
    tokens = np.zeros((len(sequences), length), dtype=np.int64)
    labels = np.zeros((len(sequences), length), dtype=np.int64)
    loss_mask = np.zeros((len(sequences), length), dtype=np.float32)
    for row, (whole, (start, stop)) in enumerate(zip(sequences, spans)):
        tokens[row, :len(whole) - 1] = whole[:-1]
        labels[row, :len(whole) - 1] = whole[1:]
        loss_mask[row, start:stop] = 1.0
    return _micro_batch(tokens, labels, loss_mask), spans
