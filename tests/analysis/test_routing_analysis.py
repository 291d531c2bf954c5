"""Routing analyses on constructed traces whose answers are known, and traces of real checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest

from olmoe_megatron.analysis import routing
from olmoe_megatron.analysis.trace import write_trace
from olmoe_megatron.config import ConfigError

E, K, L = 8, 2, 3


def _model(**changes) -> dict:
    return {"num_layers": L, "num_experts": E, "top_k": K, "d_model": 16, "vocab_size": 50, "padded_vocab_size": 64,
            **changes}


def make_trace(path: Path, expert_ids: np.ndarray, *, step: int = 10, tokens: int | None = None,
               token_ids: np.ndarray | None = None, predicted: np.ndarray | None = None,
               source: np.ndarray | None = None, sources: list[dict] | None = None, model: dict | None = None,
               chunk_tokens: int = 16) -> routing.Trace:
    layers, n, k = expert_ids.shape
    token_ids = np.arange(n) % 50 if token_ids is None else token_ids
    source = np.zeros(n, dtype=np.int64) if source is None else source
    sources = sources or [{"name": "all", "start": 0, "count": n, "description": "constructed"}]
    probs = np.sort(np.random.default_rng(0).random((layers, n, k)), axis=-1)[..., ::-1] / k
    write_trace(path, expert_ids=expert_ids, gate_probs=probs.astype(np.float32), token_ids=token_ids,
                predicted_ids=token_ids if predicted is None else predicted, source=source,
                attrs={"model": model or _model(), "step": step, "tokens": tokens if tokens is not None else step * 100,
                       "checkpoint": f"ckpt/step_{step}", "seq_length": 8, "sources": sources},
                chunk_tokens=chunk_tokens)
    return routing.Trace.open(path)


def _random_ids(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(n)]) for _ in range(L)])


def test_identical_checkpoints_saturate_at_one_and_disjoint_routing_at_zero(tmp_path):
    ids = _random_ids(40, 0)
    early = make_trace(tmp_path / "early.zarr", ids, step=10)
    final = make_trace(tmp_path / "final.zarr", ids, step=40)
    result = routing.saturation([final, early])  # any order: the most trained trace is the reference
    assert [r["step"] for r in result["checkpoints"]] == [10, 40]
    assert result["checkpoints"][0]["fraction"] == 0.25
    assert result["checkpoints"][0]["top1"] == [1.0] * L and result["checkpoints"][0][f"top{K}"] == [1.0] * L

    low = np.zeros((L, 40, K), dtype=np.int64) + np.arange(K)  # experts 0, 1
    high = low + E - K  # experts 6, 7
    disjoint = routing.saturation([make_trace(tmp_path / "low.zarr", low, step=1),
                                   make_trace(tmp_path / "high.zarr", high, step=2)])
    assert disjoint["checkpoints"][0]["top1"] == [0.0] * L and disjoint["checkpoints"][0][f"top{K}"] == [0.0] * L



def test_saturation_of_partial_overlap(tmp_path):
    reference = np.tile(np.array([0, 1]), (L, 30, 1))
    shifted = np.tile(np.array([0, 5]), (L, 30, 1))  # the top-1 agrees, one of two top-k experts does
    result = routing.saturation([make_trace(tmp_path / "a.zarr", shifted, step=5),
                                 make_trace(tmp_path / "b.zarr", reference, step=50)])
    early = result["checkpoints"][0]
    assert early["top1"] == [1.0] * L and early[f"top{K}"] == [0.5] * L


def test_coactivation_of_fixed_pairs(tmp_path):
    ids = np.zeros((L, 40, K), dtype=np.int64)
    ids[:, :30] = [0, 1]  # 30 tokens pick experts 0 and 1
    ids[:, 30:] = [0, 2]  # 10 pick 0 and 2
    result = routing.coactivation(make_trace(tmp_path / "t.zarr", ids))
    matrix = np.array(result["layers"][0]["matrix"])
    assert matrix[0, 1] == 0.75 and matrix[0, 2] == 0.25 and matrix[1, 0] == 1.0 and matrix[2, 0] == 1.0
    assert matrix[1, 2] == 0.0 and matrix[0, 0] == 1.0
    assert result["layers"][0]["top_pairs"][0]["coactivation"] == 1.0
    assert result["chance"] == pytest.approx((K - 1) / (E - 1))


def test_a_source_routed_to_one_expert_has_specialisation_one_there(tmp_path):
    n = 48
    ids = _random_ids(n, 1)
    source = np.repeat([0, 1], n // 2)
    ids[:, n // 2:, 0] = 3  # every token of source 1 goes to expert 3 (and one other)
    ids[:, n // 2:, 1] = np.where(ids[:, n // 2:, 1] == 3, 4, ids[:, n // 2:, 1])
    sources = [{"name": "web", "start": 0, "count": n // 2, "description": ""},
               {"name": "code", "start": n // 2, "count": n // 2, "description": ""}]
    result = routing.domains(make_trace(tmp_path / "t.zarr", ids, source=source, sources=sources))
    for layer in result["layers"]:
        spec = np.array(layer["specialisation"])
        assert spec[1, 3] == 1.0
        assert spec.sum(axis=1) == pytest.approx([K, K])  # each token counts in k experts
        assert layer["top"][1] == {"source": "code", "expert": 3, "value": 1.0}
    assert result["uniform"] == K / E and result["tokens_per_source"] == [n // 2, n // 2]


def test_vocabulary_specialisation_by_input_and_predicted_token(tmp_path):
    n = 40
    ids = _random_ids(n, 2)
    token_ids = np.arange(n) % 10
    ids[:, token_ids == 7, 0] = 2  # token 7 always goes to expert 2
    ids[:, token_ids == 7, 1] = 6
    predicted = np.full(n, 9)  # every prediction is token 9: each expert gets exactly its share of it
    result = routing.vocab(make_trace(tmp_path / "t.zarr", ids, token_ids=token_ids, predicted=predicted),
                           min_count=2, top_tokens=3, decode=lambda x: f"<{x}>")
    expert2 = result["layers"][0]["input"]["experts"][2]["tokens"]
    assert expert2[0] == {"id": 7, "text": "<7>", "specialisation": 1.0, "count": 4}
    routed = np.bincount(ids[0].reshape(-1), minlength=E)
    shares = [e["tokens"][0]["specialisation"] if e["tokens"] else 0.0
              for e in result["layers"][0]["predicted"]["experts"]]
    assert shares == pytest.approx(routed / n)


def test_traces_that_cannot_be_compared_are_refused(tmp_path):
    ids = _random_ids(20, 3)
    a = make_trace(tmp_path / "a.zarr", ids, step=1)
    wider = make_trace(tmp_path / "b.zarr", np.minimum(ids, 7), step=2, model=_model(num_experts=16))
    with pytest.raises(ConfigError, match=r"another model shape .*model.num_experts: 8 .* vs 16"):
        routing.saturation([a, wider])
    other_tokens = make_trace(tmp_path / "c.zarr", ids, step=3, token_ids=np.arange(20) % 50 + 1)
    with pytest.raises(ConfigError, match="different token ids"):
        routing.saturation([a, other_tokens])
    with pytest.raises(ConfigError, match="at least two traces"):
        routing.saturation([a])
    with pytest.raises(ConfigError, match=r"--layers \[5\]: .* has layers 0..2"):
        routing.domains(a, [5])
    with pytest.raises(ConfigError, match="no such routing trace"):
        routing.Trace.open(tmp_path / "missing.zarr")
    with pytest.raises(ConfigError, match="never overwritten"):
        make_trace(tmp_path / "a.zarr", ids)
