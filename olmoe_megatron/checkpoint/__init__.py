"""What training and conversion share about checkpoints.

- `format`: the directory layout (file names, the `latest` pointer, step directory names) and
  the configs a checkpoint carries.
- `weights`: model-only save and load through Megatron's dist_checkpointing, in any layout.
- `plan`: what a run loads at start (resume, new run from weights, or nothing), from its
  CheckpointConfig alone.

Training checkpoints proper (optimizer, progress, RNG, atomic commit, pruning) live in
`olmoe_megatron.training.checkpoint`; the converters in `olmoe_megatron.convert`.
"""
