"""Checkpoint conversion: HF transformers OLMoE <-> our Megatron dist checkpoints, and sparse upcycling.

- `hf_to_mcore`: config.json + safetensors (per-expert keys, or transformers 5's fused experts)
  -> a model checkpoint (dist_checkpointing torch_dist + olmoe_model.yaml, and the source
  config.json kept verbatim as hf_config.json) loadable in any layout.
- `mcore_to_hf`: a model checkpoint, a training step directory or a training root (its `latest`)
  -> config.json (the imported one written back: HF -> ours -> HF is exact, see hf_config) +
  sharded safetensors with the per-expert keys `save_pretrained` writes.
- `upcycle`: a dense checkpoint -> an MoE checkpoint whose experts are copies of the dense MLP.

Every converter runs as a single process, streams one decoder layer at a time from its source
and to its output (dist_writer writes a dist checkpoint layer by layer), so it holds about one
layer, and writes into a temporary directory next to the output that is renamed only at the end.
"""

from olmoe_megatron.convert.errors import ConversionError
from olmoe_megatron.convert.hf_to_mcore import hf_to_mcore
from olmoe_megatron.convert.mcore_to_hf import mcore_to_hf
from olmoe_megatron.convert.upcycle import upcycle

__all__ = ["ConversionError", "hf_to_mcore", "mcore_to_hf", "upcycle"]
