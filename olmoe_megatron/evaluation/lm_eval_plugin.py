"""Makes `olmoe_megatron` a model name of lm-evaluation-harness, without importing the model code.

lm-eval 0.4.13 finds models only in its registry (`lm_eval.api.registry.model_registry`), which
holds its own models (`lm_eval.models.MODEL_MAPPING`) and whatever a process registered before
calling `simple_evaluate`; it reads no entry points of other packages. So our lm-eval command
(`olmoe lm-eval` / `olmoe-lm-eval`) calls `register()` and then runs lm-eval's CLI unchanged.

    from olmoe_megatron.evaluation.lm_eval_plugin import register
    register()
    lm_eval.simple_evaluate(model="olmoe_megatron", model_args="ckpt=runs/demo/checkpoints", tasks=[...])
"""

from __future__ import annotations

MODEL_NAME = "olmoe_megatron"
"""The name lm-eval knows the adapter by (`--model olmoe_megatron`)."""
ADAPTER_PATH = "olmoe_megatron.evaluation.lm_eval_adapter:OlmoeMegatronLM"
"""The adapter class as lm-eval's lazy registry placeholder `module:attribute`."""


def register() -> None:
    """Registers the adapter under MODEL_NAME (idempotent); torch and Megatron load on first use.

    lm-eval's own models are registered first: its `get_model` imports them only into an empty
    registry, so registering ours alone would hide `hf`, `vllm` and the rest.
    """
    import lm_eval.models  # noqa: F401 - registers lm-eval's own models
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=ADAPTER_PATH)
