"""The paper's routing analyses (section 5) over routing traces (analysis/trace.py).

Definitions (shared/OLMOE_FACTS.md, "Routing analysis"), per layer, over a trace's fixed tokens:
- router saturation(t) = mean over tokens x of |TopK_t(x) & TopK_final(x)| / K, for K = 1 (the
  highest-probability expert) and K = top-k; the final checkpoint is the most trained one given.
- co-activation(Ei, Ej) = N(Ei and Ej both in a token's top-k) / N(Ei in a token's top-k).
- domain specialisation(Ei, D) = N(tokens of D routed to Ei) / N(tokens of D), against k/E.
- vocabulary specialisation(Ei, x) = N(occurrences of token id x routed to Ei) / N(occurrences of x),
  by input token id and by the predicted (argmax) token id.

Every analysis reads the trace a chunk at a time (one layer, chunk tokens), so a trace of a million
tokens of OLMoE-1B-7B needs tens of megabytes, not the whole store.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from olmoe_megatron.config import ConfigError

#: Model fields that must agree between traces compared with each other.
SHAPE_FIELDS = ("num_layers", "num_experts", "top_k", "d_model", "vocab_size", "padded_vocab_size")


@dataclasses.dataclass
class Trace:
    """An opened routing trace (read-only)."""

    path: Path
    root: object

    @classmethod
    def open(cls, path: str | Path) -> "Trace":
        import zarr

        from olmoe_megatron.analysis.trace import FORMAT, ROUTING_ARRAYS, TOKEN_ARRAYS

        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path}: no such routing trace (a zarr store written by `olmoe analyze trace`)")
        try:
            root = zarr.open_group(str(path), mode="r")
        except Exception as exc:  # zarr raises several types for a non-store directory
            raise ConfigError(f"{path}: not a zarr store ({type(exc).__name__}: {exc})") from None
        if root.attrs.get("format") != FORMAT:
            raise ConfigError(f"{path}: attrs.format={root.attrs.get('format')!r}, expected {FORMAT!r} "
                              "(record it with `olmoe analyze trace`)")
        missing = [name for name in (*ROUTING_ARRAYS, *TOKEN_ARRAYS) if name not in root]
        if missing:
            raise ConfigError(f"{path}: incomplete trace, missing arrays {missing}")
        trace = cls(path, root)
        layers, tokens, k = root["expert_ids"].shape
        model = trace.model
        if (layers, k) != (model["num_layers"], model["top_k"]) or root["gate_probs"].shape != (layers, tokens, k):
            raise ConfigError(f"{path}: arrays of shape {root['expert_ids'].shape} do not match its model "
                              f"({model['num_layers']} layers, top-{model['top_k']})")
        for name in TOKEN_ARRAYS:
            if root[name].shape != (tokens,):
                raise ConfigError(f"{path}: {name} has shape {root[name].shape}, expected ({tokens},)")
        return trace

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    @property
    def model(self) -> dict:
        return self.root.attrs["model"]

    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.model["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.model["top_k"])

    @property
    def num_tokens(self) -> int:
        return int(self.root["token_ids"].shape[0])

    @property
    def sources(self) -> list[dict]:
        return list(self.root.attrs["sources"])

    @property
    def chunk_tokens(self) -> int:
        return int(self.root["expert_ids"].chunks[1])

    def label(self) -> str:
        step = self.root.attrs.get("step")
        return f"step {step}" if step is not None else self.path.name

    def blocks(self):
        """(start, stop) token ranges of one zarr chunk each."""
        size = self.chunk_tokens
        for start in range(0, self.num_tokens, size):
            yield start, min(start + size, self.num_tokens)

    def expert_ids(self, layer: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.asarray(self.root["expert_ids"][layer, start:stop], dtype=np.int64)

    def tokens(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.asarray(self.root[name][start:stop], dtype=np.int64)


def check_comparable(traces: list[Trace]) -> None:
    """Raises ConfigError unless the traces share the model shape and cover the same tokens."""
    first = traces[0]
    for other in traces[1:]:
        differ = [f"model.{f}: {first.model.get(f)} in {first.path} vs {other.model.get(f)}"
                  for f in SHAPE_FIELDS if first.model.get(f) != other.model.get(f)]
        if differ:
            raise ConfigError(f"{other.path} has another model shape than {first.path} ({'; '.join(differ)}); "
                              "compare checkpoints of one model")
        if other.num_tokens != first.num_tokens or other.sources != first.sources:
            raise ConfigError(f"{other.path} covers other tokens than {first.path} ({other.num_tokens:,} vs "
                              f"{first.num_tokens:,} tokens, sources {[s['name'] for s in other.sources]} vs "
                              f"{[s['name'] for s in first.sources]}); trace every checkpoint with the same "
                              "--data, --tokens and --train.seq_length")
        for start, stop in first.blocks():
            if not np.array_equal(first.tokens("token_ids", start, stop), other.tokens("token_ids", start, stop)):
                raise ConfigError(f"{other.path} and {first.path} hold different token ids at positions "
                                  f"{start}..{stop}; trace every checkpoint with the same --data and --tokens")


def _progress(trace: Trace) -> tuple[float, float]:
    """What orders checkpoints by training: (tokens, step) where recorded."""
    attrs = trace.root.attrs
    tokens, step = attrs.get("tokens"), attrs.get("step")
    return (float(tokens) if tokens is not None else float("nan"), float(step) if step is not None else float("nan"))


# ----------------------------------------------------------------------------------- saturation
def saturation(traces: list[Trace]) -> dict:
    """Router saturation of every trace against the most trained one (by tokens, else by step)."""
    if len(traces) < 2:
        raise ConfigError("router saturation compares checkpoints: give at least two traces (the last one trained "
                          "the longest is the reference)")
    check_comparable(traces)
    progress = [_progress(t) for t in traces]
    key = 0 if all(p[0] == p[0] for p in progress) else 1
    if any(p[key] != p[key] for p in progress):
        raise ConfigError("router saturation needs each trace's training progress (attrs tokens or step); "
                          f"{[str(t.path) for t, p in zip(traces, progress) if p[key] != p[key]]} record neither")
    order = sorted(range(len(traces)), key=lambda i: progress[i][key])
    final = traces[order[-1]]
    k = final.top_k
    rows = []
    for i in order:
        trace = traces[i]
        top1, topk = [], []
        for layer in range(final.num_layers):
            same1 = overlap = 0
            for start, stop in final.blocks():
                mine, ref = trace.expert_ids(layer, start, stop), final.expert_ids(layer, start, stop)
                same1 += int((mine[:, 0] == ref[:, 0]).sum())
                overlap += int((mine[:, :, None] == ref[:, None, :]).any(axis=2).sum())
            top1.append(same1 / final.num_tokens)
            topk.append(overlap / (final.num_tokens * k))
        fraction = progress[i][key] / progress[order[-1]][key] if progress[order[-1]][key] else float("nan")
        rows.append({"trace": str(trace.path), "checkpoint": trace.root.attrs.get("checkpoint"),
                     "step": trace.root.attrs.get("step"), "tokens": trace.root.attrs.get("tokens"),
                     "fraction": fraction, "top1": top1, f"top{k}": topk})
    return {"analysis": "saturation", "final": str(final.path), "fraction_by": ("tokens", "step")[key],
            "num_layers": final.num_layers, "top_k": k, "num_tokens": final.num_tokens, "checkpoints": rows}


# --------------------------------------------------------------------------------- co-activation
def coactivation_counts(trace: Trace, layer: int) -> np.ndarray:
    """[E, E] int64: N(Ei and Ej both in a token's top-k); the diagonal is N(Ei in a token's top-k)."""
    experts = trace.num_experts
    counts = np.zeros(experts * experts, dtype=np.int64)
    for start, stop in trace.blocks():
        ids = trace.expert_ids(layer, start, stop)
        pairs = (ids[:, :, None] * experts + ids[:, None, :]).reshape(-1)
        counts += np.bincount(pairs, minlength=experts * experts)
    return counts.reshape(experts, experts)


def coactivation(trace: Trace, layers: list[int] | None = None, *, top_pairs: int = 5) -> dict:
    """Co-activation matrices (row i: conditioned on Ei being chosen) and each layer's top pairs."""
    layers = _layers(trace, layers)
    # Any row of the matrix sums to k - 1 off the diagonal: (k-1)/(E-1) is co-activation by chance.
    chance = (trace.top_k - 1) / (trace.num_experts - 1) if trace.num_experts > 1 else 0.0
    out = []
    for layer in layers:
        counts = coactivation_counts(trace, layer)
        chosen = np.diag(counts).astype(np.float64)
        matrix = np.divide(counts, chosen[:, None], out=np.zeros(counts.shape), where=chosen[:, None] > 0)
        off = matrix.copy()
        np.fill_diagonal(off, -1.0)
        flat = np.argsort(off, axis=None)[::-1][:top_pairs]
        pairs = [{"i": int(f // trace.num_experts), "j": int(f % trace.num_experts),
                  "coactivation": float(off.flat[f])} for f in flat]
        np.fill_diagonal(off, np.nan)
        out.append({"layer": layer, "matrix": matrix.tolist(), "top_pairs": pairs,
                    "max_off_diagonal": float(np.nanmax(off)),
                    "pairs_over_twice_chance": int((off > 2 * chance).sum())})
    return {"analysis": "coactivation", "trace": str(trace.path), "num_experts": trace.num_experts,
            "top_k": trace.top_k, "num_tokens": trace.num_tokens, "chance": chance, "layers": out}


# ------------------------------------------------------------------------------------- domains
def domains(trace: Trace, layers: list[int] | None = None) -> dict:
    """Domain specialisation [source, expert] per layer, against the uniform k/E."""
    layers = _layers(trace, layers)
    experts, sources = trace.num_experts, trace.sources
    totals = np.zeros(len(sources), dtype=np.int64)
    for start, stop in trace.blocks():
        totals += np.bincount(trace.tokens("source", start, stop), minlength=len(sources))[:len(sources)]
    out = []
    for layer in layers:
        counts = np.zeros(len(sources) * experts, dtype=np.int64)
        for start, stop in trace.blocks():
            ids, src = trace.expert_ids(layer, start, stop), trace.tokens("source", start, stop)
            counts += np.bincount((src[:, None] * experts + ids).reshape(-1), minlength=len(sources) * experts)
        share = counts.reshape(len(sources), experts) / np.maximum(totals, 1)[:, None]
        out.append({"layer": layer, "specialisation": share.tolist(),
                    "top": [{"source": s["name"], "expert": int(share[i].argmax()), "value": float(share[i].max())}
                            for i, s in enumerate(sources)]})
    return {"analysis": "domains", "trace": str(trace.path), "sources": [s["name"] for s in sources],
            "tokens_per_source": totals.tolist(), "uniform": trace.top_k / experts, "num_experts": experts,
            "top_k": trace.top_k, "layers": out}


# --------------------------------------------------------------------------------- vocabulary
def vocab_counts(trace: Trace, layer: int, by: str) -> tuple[np.ndarray, np.ndarray]:
    """([E, V] routed occurrences of each token id per expert, [V] occurrences), V = padded vocab."""
    name = {"input": "token_ids", "predicted": "predicted_ids"}[by]
    experts, vocab = trace.num_experts, int(trace.model["padded_vocab_size"])
    routed = np.zeros(experts * vocab, dtype=np.int64)
    seen = np.zeros(vocab, dtype=np.int64)
    for start, stop in trace.blocks():
        token = trace.tokens(name, start, stop)
        ids = trace.expert_ids(layer, start, stop)
        routed += np.bincount((ids * vocab + token[:, None]).reshape(-1), minlength=experts * vocab)
        seen += np.bincount(token, minlength=vocab)
    return routed.reshape(experts, vocab), seen


def vocab(trace: Trace, layers: list[int] | None = None, *, top_tokens: int = 10, min_count: int = 5,
          decode=None) -> dict:
    """Vocabulary specialisation by input and by predicted token id.

    Per layer and kind: each expert's `top_tokens` most specialised token ids among those seen at
    least `min_count` times (decoded with `decode(id) -> str` when given), and the layer's mean
    specialisation: over experts, the average of spec(Ei, x) over the tokens Ei receives.
    """
    if min_count < 1 or top_tokens < 1:
        raise ConfigError(f"--min-count={min_count} and --top-tokens={top_tokens} must be >= 1")
    layers = _layers(trace, layers)
    out = []
    for layer in layers:
        entry = {"layer": layer}
        for by in ("input", "predicted"):
            routed, seen = vocab_counts(trace, layer, by)
            spec = np.divide(routed, seen[None, :], out=np.zeros(routed.shape), where=seen[None, :] > 0)
            received = routed.sum(axis=1)
            mean_spec = np.divide((routed * spec).sum(axis=1), received, out=np.zeros(len(received)),
                                  where=received > 0)
            frequent = seen >= min_count
            experts = []
            for e in range(trace.num_experts):
                score = np.where(frequent, spec[e], -1.0)
                best = [int(x) for x in np.lexsort((-seen, -score))[:top_tokens] if score[x] > 0]
                experts.append({"expert": e, "tokens": [
                    {"id": x, "text": decode(x) if decode else None, "specialisation": float(spec[e, x]),
                     "count": int(seen[x])} for x in best]})
            entry[by] = {"mean_specialisation": float(mean_spec[received > 0].mean()) if (received > 0).any() else 0.0,
                         "per_expert_mean": mean_spec.tolist(), "experts": experts}
        out.append(entry)
    return {"analysis": "vocab", "trace": str(trace.path), "num_experts": trace.num_experts, "top_k": trace.top_k,
            "min_count": min_count, "layers": out}


def _layers(trace: Trace, layers: list[int] | None) -> list[int]:
    if layers is None:
        return list(range(trace.num_layers))
    bad = [layer for layer in layers if not 0 <= layer < trace.num_layers]
    if bad:
        raise ConfigError(f"--layers {bad}: {trace.path} has layers 0..{trace.num_layers - 1}")
    return list(layers)
