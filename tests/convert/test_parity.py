"""Our model, loaded from a converted HF checkpoint in each layout, gives HF's logits and loss."""

from __future__ import annotations

import pytest
import torch

from olmoe_megatron.testing.distributed import get_pool
from olmoe_megatron.testing.hf_parity import hf_outputs, layout_outputs, random_tokens, router_losses

RECIPES = ("olmoe_tiny", "olmoe_small")
LOGIT_TOL = 1e-4
LOSS_TOL = 1e-5
LAYOUTS_2 = {
    "tp2": {"tensor_parallel": 2, "sequence_parallel": True},
    "ep2": {"expert_parallel": 2},
    "pp2": {"pipeline_parallel": 2},
}
LAYOUT_8 = {"tensor_parallel": 2, "expert_parallel": 2, "pipeline_parallel": 2, "sequence_parallel": True}


@pytest.fixture(scope="module")
def pools():
    pools = {}
    yield lambda n: pools.setdefault(n, get_pool(n))
    for pool in pools.values():
        pool.close()


@pytest.fixture(scope="module")
def reference(converted):
    """{recipe: (tokens, HF outputs)}."""
    out = {}
    for name, (model, hf_dir, _) in converted.items():
        tokens = random_tokens(num_sequences=2, seq_length=16, vocab_size=model.vocab_size, seed=3)
        out[name] = (tokens, hf_outputs(hf_dir, tokens))
    return out


def _check(results: list[dict], hf: dict) -> None:
    logits = [r["logits"] for r in results if r["logits"] is not None]
    assert logits, "no rank returned logits"
    for ours in logits:
        diff = (ours - hf["logits"]).abs().max().item()
        assert diff <= LOGIT_TOL, f"{results[0]['layout']}: max |logits - HF| = {diff:.3g}"
    for r in results:
        assert abs(r["lm_loss"] - hf["ce"]) <= LOSS_TOL, (r["layout"], r["lm_loss"], hf["ce"])


@pytest.mark.parametrize("name", RECIPES)
def test_single_process_logits_and_loss_equal_hf(name, converted, reference):
    model, _, ckpt = converted[name]
    tokens, hf = reference[name]
    _check([layout_outputs(model.to_dict(), {}, checkpoint=str(ckpt), tokens=tokens)], hf)


@pytest.mark.parametrize("layout", list(LAYOUTS_2))
def test_two_rank_layouts_equal_hf(layout, converted, reference, pools):
    for name in RECIPES:
        model, _, ckpt = converted[name]
        tokens, hf = reference[name]
        _check(pools(2).run(layout_outputs, model.to_dict(), LAYOUTS_2[layout], checkpoint=str(ckpt), tokens=tokens), hf)


def test_tp2_ep2_pp2_equals_hf(converted, reference, pools):
    for name in RECIPES:
        model, _, ckpt = converted[name]
        tokens, hf = reference[name]
        _check(pools(8).run(layout_outputs, model.to_dict(), LAYOUT_8, checkpoint=str(ckpt), tokens=tokens), hf)


def test_load_balancing_normalisations(converted, reference):
    """HF pools layers and sums top-k slots; ours is megablocks' mean over layers (see testing/lb_loss.py)."""
    from olmoe_megatron.testing.lb_loss import hf_lb_from_stats, olmoe_lb_from_stats, routing_statistics

    model, _, ckpt = converted["olmoe_small"]
    tokens, hf = reference["olmoe_small"]
    fractions, probs = routing_statistics(hf["router_logits"], top_k=model.top_k)
    # HF's aux_loss is exactly its pooled formula of the per-layer statistics ...
    assert hf["aux_loss"] == pytest.approx(hf_lb_from_stats(fractions, probs), rel=1e-5)
    # ... and ours (from Megatron's routers in a training step) is the mean-over-layers formula.
    ours = router_losses(model.to_dict(), checkpoint=str(ckpt), tokens=tokens)
    assert ours["lm_loss"] == pytest.approx(hf["ce"], abs=LOSS_TOL)
    expected = olmoe_lb_from_stats(fractions, probs, top_k=model.top_k, weight=model.router_aux_loss_coeff)
    assert ours["lb_loss"] == pytest.approx(expected, rel=1e-5)
    # Per layer the two differ by exactly the factor top_k; pooled over layers they do not.
    for layer in range(model.num_layers):
        f, p = fractions[layer:layer + 1], probs[layer:layer + 1]
        assert hf_lb_from_stats(f, p) == pytest.approx(model.top_k * olmoe_lb_from_stats(f, p, top_k=model.top_k), rel=1e-12)
    assert hf["aux_loss"] != pytest.approx(model.top_k * ours["lb_loss"] / model.router_aux_loss_coeff, rel=1e-6)
