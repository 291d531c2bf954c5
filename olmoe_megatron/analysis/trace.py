"""Routing traces: every layer's top-k experts and gate probabilities for a fixed token set, in zarr.

    olmoe analyze trace --ckpt runs/demo/checkpoints --data '[{name: stdlib, demo_heldout: true}]' \\
        --tokens 65536 --out runs/demo/traces/step_250.zarr

The token set of each source is its first `tokens` positions of the evaluation windows (the same
fixed windows `olmoe eval` scores: evaluation/sources.py), so traces of different checkpoints of one
run cover the same tokens in the same order and can be compared position by position.

Store layout (zarr v3, Blosc zstd):
    expert_ids     uint8/uint16 [L, N, k]  each token's experts per layer, by gate probability, highest first
    gate_probs     float32      [L, N, k]  their router probabilities (softmax over all experts, as routed)
    token_ids      int32        [N]        the input token at each position
    predicted_ids  int32        [N]        the model's argmax next-token prediction at that position
    source         uint16       [N]        index into attrs["sources"]
Attributes: format, model (the ModelConfig), checkpoint, step, tokens (trained tokens when the
checkpoint records them), seq_length, sources ([{name, start, count, description}]), data (the run's
data config, for the tokenizer). Chunks are (1 layer, chunk_tokens, k).

The model runs on one process (a checkpoint saved in any layout loads into it: expert-parallel
shards are gathered); tokens stream through in micro-batches and are written a chunk at a time, so
memory holds the model and one chunk of trace. The store is written under a temporary name next to
`out` and renamed when complete: an interrupted trace leaves no store behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from olmoe_megatron.config import ConfigError

logger = logging.getLogger(__name__)

FORMAT = "olmoe-routing-trace/1"
ROUTING_ARRAYS = ("expert_ids", "gate_probs")
TOKEN_ARRAYS = ("token_ids", "predicted_ids", "source")


@dataclasses.dataclass(frozen=True)
class TraceSource:
    name: str
    start: int
    count: int
    description: str


def _compressor():
    import zarr

    return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


class _RouterRecorder:
    """Forward hooks on every layer's router: its top-k experts and probabilities, batch-major."""

    def __init__(self, chunks: list[torch.nn.Module], *, top_k: int):
        self.top_k = top_k
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        for chunk in chunks:
            module = getattr(chunk, "module", chunk)
            for layer in module.decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if router is None:
                    raise ConfigError("olmoe analyze trace needs an MoE model; this checkpoint's layers have no router "
                                      "(model.num_experts=0)")
                number = layer.layer_number - 1  # Megatron numbers layers from 1
                self.handles.append(router.register_forward_hook(self._hook(number)))

    def _hook(self, number: int):
        def hook(module, inputs, output):
            del module, inputs
            probs = output[0].detach().float()
            values, ids = torch.topk(probs, self.top_k, dim=-1)  # the routed experts: the only non-zeros
            self.layers[number] = (ids, values)
        return hook

    def take(self, *, seq_length: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """[L, B*S, k] expert ids and probabilities of the last forward, in (window, position) order."""
        ids, probs = [], []
        for number in sorted(self.layers):
            layer_ids, layer_probs = self.layers[number]
            # Megatron's hidden states are [S, B, H]: token t = s * B + b.
            ids.append(layer_ids.view(seq_length, batch, -1).transpose(0, 1).reshape(batch * seq_length, -1))
            probs.append(layer_probs.view(seq_length, batch, -1).transpose(0, 1).reshape(batch * seq_length, -1))
        self.layers.clear()
        return torch.stack(ids).numpy(), torch.stack(probs).numpy()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _checkpoint_tokens(step_dir: Path) -> int | None:
    from megatron.core.dist_checkpointing import load_common_state_dict

    try:
        progress = (load_common_state_dict(str(step_dir)) or {}).get("progress")
    except Exception:  # a model-only conversion may have no common state
        return None
    return int(progress["tokens"]) if progress else None


def _source_tokens(run, data_spec: str, *, tokens: int):
    """[(TraceSource name/description, tokens [W, S], count)] for each source of `data_spec`."""
    from olmoe_megatron.config.base import parse_override_args
    from olmoe_megatron.evaluation.sources import source_windows

    flags = parse_override_args([f"--eval.datasets={data_spec}", f"--eval.tokens={tokens}"])
    run = run.with_overrides(flags)
    if not run.eval.datasets:
        raise ConfigError("--data gives no source; e.g. --data '[{name: stdlib, demo_heldout: true}]'")
    out = []
    for source in run.eval.datasets:
        windows = source_windows(source, run.data, max_tokens=tokens, seq_length=run.train.seq_length,
                                 vocab_size=run.model.vocab_size, micro_batch_size=1)
        available = windows.tokens.size
        if available < tokens:
            raise ConfigError(
                f"--data source {source.name!r} ({windows.description}) has {available:,} tokens in whole windows of "
                f"{run.train.seq_length}, fewer than --tokens={tokens:,}; lower --tokens or give a larger source")
        out.append((source.name, windows.description, windows.tokens))
    return run, out


def record_trace(ckpt: str | Path, *, data: str, tokens: int, out: str | Path, overrides: list[str] = (),
                 micro_batch_size: int = 4, chunk_tokens: int = 65_536) -> dict:
    """Records the routing trace of `ckpt` over `tokens` tokens of each source in `data` to `out`.

    Args:
        ckpt: checkpoint root (its latest step) or step directory.
        data: the sources, as eval.datasets takes them (a YAML list of {name, paths | share | demo_heldout}).
        tokens: tokens per source.
        out: the zarr store to create (must not exist).
        overrides: run-config overrides (--train.seq_length, --precision.dtype, --data.tokenizer).
        micro_batch_size: windows per forward.
        chunk_tokens: tokens per zarr chunk.

    Returns:
        The store's attributes.
    """
    import torch.distributed as dist

    from olmoe_megatron.config.base import config_to_dict
    from olmoe_megatron.evaluation.checkpoint_eval import checkpoint_run_config, checkpoint_step, load_checkpoint_model
    from olmoe_megatron.evaluation.forward import evaluation_mode

    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {str(out)!r} exists; give a new path (a trace is never overwritten)")
    if tokens < 1 or micro_batch_size < 1 or chunk_tokens < 1:
        raise ConfigError(f"--tokens={tokens}, --micro-batch-size={micro_batch_size} and chunk_tokens={chunk_tokens} "
                          "must be >= 1")
    step_dir, run = checkpoint_run_config(ckpt, list(overrides))
    model = run.model
    if not model.is_moe:
        raise ConfigError(f"{step_dir}: a dense model (model.num_experts=0) has no routing to trace")
    if getattr(model, "router_type", "token_choice") != "token_choice":
        raise ConfigError(f"{step_dir}: model.router_type={model.router_type!r} gives tokens a varying number of "
                          "experts; routing traces record token choice's top-k (model.router_type=token_choice)")
    run, sources = _source_tokens(run, data, tokens=tokens)
    context, chunks = load_checkpoint_model(step_dir, run)
    if dist.get_world_size() != 1:
        raise ConfigError(f"olmoe analyze trace runs on one process (this job has {dist.get_world_size()}); any "
                          "checkpoint layout loads into it")
    seq, k, layers = run.train.seq_length, model.top_k, model.num_layers
    total = tokens * len(sources)
    chunk_tokens = min(chunk_tokens, total)
    id_dtype = np.uint8 if model.num_experts <= 256 else np.uint16
    trace_sources, start = [], 0
    for name, description, _ in sources:
        trace_sources.append(TraceSource(name, start, tokens, description))
        start += tokens
    attrs = {
        "format": FORMAT, "model": config_to_dict(model), "checkpoint": str(step_dir), "step": checkpoint_step(step_dir),
        "tokens": _checkpoint_tokens(step_dir), "seq_length": seq, "precision": run.precision.dtype,
        "sources": [dataclasses.asdict(s) for s in trace_sources], "data": config_to_dict(run.data),
    }
    with _new_store(out, layers=layers, tokens=total, top_k=k, id_dtype=id_dtype, chunk_tokens=chunk_tokens) as store:
        writer = _ChunkWriter(store.arrays, chunk_tokens=chunk_tokens)
        recorder = _RouterRecorder(chunks, top_k=k)
        try:
            with evaluation_mode(chunks):
                for index, (_, _, windows) in enumerate(sources):
                    _trace_source(chunks[0], recorder, writer, windows, count=tokens, source=index,
                                  micro_batch_size=micro_batch_size, vocab_size=model.vocab_size, device=context.device)
        finally:
            recorder.close()
        writer.flush()
        assert writer.written == total, (writer.written, total)
        store.root.attrs.update(attrs)
    logger.info("wrote %s: %d layers x %d tokens x top-%d", out, layers, total, k)
    return attrs


def _trace_source(model, recorder: _RouterRecorder, writer: "_ChunkWriter", windows: np.ndarray, *, count: int,
                  source: int, micro_batch_size: int, vocab_size: int, device) -> None:
    seq = windows.shape[1]
    needed = -(-count // seq)
    left = count
    for first in range(0, needed, micro_batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(windows[first:min(first + micro_batch_size, needed)])).to(device)
        size = batch.shape[0]
        positions = torch.arange(seq, device=device).unsqueeze(0).expand(size, -1)
        logits = model(batch, positions, None)
        predicted = logits[..., :vocab_size].argmax(dim=-1).reshape(-1).cpu().numpy()
        ids, probs = recorder.take(seq_length=seq, batch=size)
        keep = min(left, size * seq)
        writer.add(ids[:, :keep], probs[:, :keep], batch.reshape(-1).cpu().numpy()[:keep], predicted[:keep],
                   np.full(keep, source, dtype=np.uint16))
        left -= keep


@dataclasses.dataclass
class _Store:
    root: object
    arrays: dict


@contextlib.contextmanager
def _new_store(out: Path, *, layers: int, tokens: int, top_k: int, id_dtype, chunk_tokens: int):
    """A trace store under a temporary name beside `out`, renamed to `out` when the block completes
    (removed if it raises)."""
    import zarr

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        root = zarr.open_group(str(partial), mode="w")
        arrays = {}
        for name, dtype in (("expert_ids", id_dtype), ("gate_probs", np.float32)):
            arrays[name] = root.create_array(name, shape=(layers, tokens, top_k), chunks=(1, chunk_tokens, top_k),
                                             dtype=dtype, compressors=_compressor())
        for name, dtype in (("token_ids", np.int32), ("predicted_ids", np.int32), ("source", np.uint16)):
            arrays[name] = root.create_array(name, shape=(tokens,), chunks=(chunk_tokens,), dtype=dtype,
                                             compressors=_compressor())
        yield _Store(root, arrays)
        if out.exists():
            raise ConfigError(f"{out} appeared while this trace was written (another process?); this one is discarded")
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_trace(out: str | Path, *, expert_ids: np.ndarray, gate_probs: np.ndarray, token_ids: np.ndarray,
                predicted_ids: np.ndarray, source: np.ndarray, attrs: dict, chunk_tokens: int = 65_536) -> None:
    """Writes a complete trace from arrays (the layout in the module docstring; `attrs` must hold
    model, sources and the rest). For traces made elsewhere, and for tests with known answers."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists; a trace is never overwritten")
    layers, tokens, top_k = expert_ids.shape
    id_dtype = np.uint8 if attrs["model"]["num_experts"] <= 256 else np.uint16
    with _new_store(out, layers=layers, tokens=tokens, top_k=top_k, id_dtype=id_dtype,
                    chunk_tokens=min(chunk_tokens, tokens)) as store:
        writer = _ChunkWriter(store.arrays, chunk_tokens=min(chunk_tokens, tokens))
        writer.add(expert_ids, gate_probs, token_ids, predicted_ids, source)
        writer.flush()
        store.root.attrs.update({"format": FORMAT, **attrs})


class _ChunkWriter:
    """Buffers rows until a whole zarr chunk is ready, then writes it (no partial-chunk rewrites)."""

    def __init__(self, arrays: dict, *, chunk_tokens: int):
        self.arrays, self.chunk_tokens = arrays, chunk_tokens
        self.pending: list[tuple] = []
        self.pending_rows = 0
        self.written = 0

    def add(self, ids, probs, token_ids, predicted, source) -> None:
        self.pending.append((ids, probs, token_ids, predicted, source))
        self.pending_rows += token_ids.shape[0]
        if self.pending_rows >= self.chunk_tokens:
            self._write(final=False)

    def flush(self) -> None:
        if self.pending_rows:
            self._write(final=True)

    def _write(self, *, final: bool) -> None:
        ids = np.concatenate([p[0] for p in self.pending], axis=1)
        probs = np.concatenate([p[1] for p in self.pending], axis=1)
        flat = [np.concatenate([p[i] for p in self.pending]) for i in (2, 3, 4)]
        rows = ids.shape[1] if final else (ids.shape[1] // self.chunk_tokens) * self.chunk_tokens
        stop = self.written + rows
        self.arrays["expert_ids"][:, self.written:stop] = ids[:, :rows].astype(self.arrays["expert_ids"].dtype)
        self.arrays["gate_probs"][:, self.written:stop] = probs[:, :rows]
        for name, values in zip(TOKEN_ARRAYS, flat):
            self.arrays[name][self.written:stop] = values[:rows].astype(self.arrays[name].dtype)
        self.written = stop
        rest = ids.shape[1] - rows
        self.pending = [(ids[:, rows:], probs[:, rows:], *(v[rows:] for v in flat))] if rest else []
        self.pending_rows = rest
