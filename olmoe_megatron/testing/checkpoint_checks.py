"""Checkpoint checks that need a process group (for tests/training/test_checkpoint_safety.py)."""

from __future__ import annotations

import torch


class ExtraStateModule(torch.nn.Module):
    """Stands in for a Transformer Engine module: state kept through get/set_extra_state (TE's FP8
    metadata), which a local-spec checkpoint never holds."""

    def __init__(self):
        super().__init__()
        self.extra = torch.tensor([7.0])

    def get_extra_state(self):
        return self.extra

    def set_extra_state(self, state):
        self.extra = state


def _tiny_model():
    from olmoe_megatron.model.build import build_model_chunks
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.recipes import get_recipe

    run = get_recipe("olmoe_tiny")
    context = initialize(run.parallel, run.model, seed=run.train.seed, backend="gloo")
    return build_model_chunks(run.model, context, precision=run.precision)


def local_checkpoint_into_model_with_extra_state(directory: str) -> dict:
    """Saves a local-spec model, loads it into the same model with an extra-state module added (as
    the TE spec has), then into one with an extra parameter the checkpoint lacks."""
    from olmoe_megatron.checkpoint.format import CheckpointFormatError
    from olmoe_megatron.checkpoint.weights import load_model, save_model

    saved = _tiny_model()
    save_model(saved, directory)
    target = _tiny_model()
    for layer in target[0].decoder.layers:  # as in the TE spec: the same module in every layer
        layer.te_like = ExtraStateModule()
    with torch.no_grad():
        for p in target[0].parameters():
            p.zero_()
    load_model(target, directory)
    saved_state, target_state = saved[0].state_dict(), target[0].state_dict()
    weights_equal = all(torch.equal(value, target_state[key]) for key, value in saved_state.items()
                        if torch.is_tensor(value) and not key.endswith("_extra_state"))
    extra_kept = all(torch.equal(layer.te_like.extra, torch.tensor([7.0])) for layer in target[0].decoder.layers)
    wrong = _tiny_model()
    for layer in wrong[0].decoder.layers:
        layer.unknown = torch.nn.Linear(2, 2, bias=False)
    try:
        load_model(wrong, directory)
        missing_error = None
    except CheckpointFormatError as exc:
        missing_error = str(exc)
    return {"weights_equal": weights_equal, "extra_state_kept": extra_kept, "missing_error": missing_error}


def optimizer_state_at_start(run_dict: dict) -> dict:
    """What a run starts from (`trainer.start_training_state`, as the trainer builds and loads it):
    its progress, and its optimizer's per-parameter state (Adam moments and step) and options in
    parameter order."""
    import dataclasses

    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.run_config import RunConfig
    from olmoe_megatron.training.trainer import start_training_state

    run = RunConfig.from_dict(run_dict)
    context = initialize(run.parallel, run.model, seed=run.train.seed, timeout_minutes=run.train.collective_timeout_minutes)
    state = start_training_state(run, context)
    per_param, options = [], []
    for sub in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        inner = sub.optimizer
        for group in inner.param_groups:
            options.append({k: v for k, v in group.items() if k in ("betas", "eps", "weight_decay")})
            for param in group["params"]:
                per_param.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in inner.state.get(param, {}).items()})
    return {"progress": dataclasses.asdict(state.progress), "state": per_param, "options": options}


def save_weights_only(checkpoint: str, directory: str) -> None:
    """Writes the model weights of olmoe_tiny's training `checkpoint` alone (as a conversion writes
    them) to `directory`."""
    from olmoe_megatron.checkpoint.weights import load_model, save_model

    chunks = _tiny_model()
    load_model(chunks, checkpoint)
    save_model(chunks, directory)
