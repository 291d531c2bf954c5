"""The checkpoint directory format, shared by training and the converters.

Layout of a checkpoint root (written by training):
    ROOT/step_0000100/                 a committed checkpoint (Megatron dist_checkpointing, torch_dist)
    ROOT/step_0000100/olmoe_run.yaml   the run config that wrote it
    ROOT/step_0000100/olmoe_model.yaml its model config
    ROOT/step_0000100/olmoe_manifest.json  every file with its size and checksum (manifest.py)
    ROOT/latest                        name of the newest committed step directory

A model checkpoint (written by a converter) is one such directory with `olmoe_model.yaml`, its
manifest and, when the source had them, the tokenizer files in `hf_tokenizer/`; one imported from
HF also keeps the source config.json as `hf_config.json` and the import's record as
`hf_import.json` (olmoe_megatron.convert.hf_config), which the export writes back.
"""

from __future__ import annotations

import re
from pathlib import Path

from olmoe_megatron.config.base import Config, dump_yaml, load_yaml
from olmoe_megatron.model.config import ModelConfig

LATEST = "latest"
RUN_FILE = "olmoe_run.yaml"
MODEL_FILE = "olmoe_model.yaml"
TOKENIZER_DIR = "hf_tokenizer"


class CheckpointFormatError(FileNotFoundError):
    """A checkpoint path lacks what the format promises (a step `latest` names, a config file).

    Callers with their own error type (the converters' ConversionError) translate it; the
    message names the path and what is missing.
    """


#: A step directory's name (step_dir_name), the only thing `latest` may hold.
STEP_NAME = re.compile(r"step_[0-9]{7,}")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def read_latest(root: str | Path) -> Path | None:
    """The step directory ROOT/latest names; None when ROOT has no `latest` (nothing saved yet)."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    fix = (f"write the name of the newest complete step directory of {root} into it (e.g. step_0000100), "
           "or remove it to start the run over")
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(f"{pointer} cannot be read as a step directory name ({exc}); {fix}") from None
    if not STEP_NAME.fullmatch(name):
        # Also what keeps `latest` inside its root: '../elsewhere/step_0000002' is no step name.
        raise CheckpointFormatError(f"{pointer} holds {name[:80]!r}, not a step directory name like "
                                    f"step_0000100; {fix}")
    target = Path(root) / name
    if not target.is_dir():
        raise CheckpointFormatError(f"{pointer} names {name}, which does not exist in {root}; {fix}")
    return target


def follow_latest(path: str | Path) -> Path:
    """A root with `latest` -> its newest step directory; any other path -> itself (unchecked)."""
    return read_latest(path) or Path(path)


def read_model_config(ckpt: str | Path) -> ModelConfig:
    """The checkpoint's ModelConfig: olmoe_model.yaml, else olmoe_run.yaml's model (dir, then parent)."""
    ckpt = Path(ckpt)
    for directory in (ckpt, ckpt.parent):
        if (directory / MODEL_FILE).is_file():
            return load_yaml(ModelConfig, directory / MODEL_FILE)
        if (directory / RUN_FILE).is_file():
            from olmoe_megatron.run_config import RunConfig

            return load_yaml(RunConfig, directory / RUN_FILE).model
    raise CheckpointFormatError(
        f"no {MODEL_FILE} or {RUN_FILE} in {ckpt} or {ckpt.parent}: the architecture is unknown"
    )


#: ModelConfig fields that set the names or shapes of a checkpoint's tensors (the others, such as
#: loss coefficients, rope_theta or the dispatcher, may change between a save and a load).
ARCHITECTURE_FIELDS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "padded_vocab_size",
                       "norm_type", "qk_norm", "num_experts", "expert_ffn_hidden_size", "num_shared_experts",
                       "ffn_hidden_size", "router_expert_bias")


def _architecture(model: ModelConfig) -> dict:
    values = {name: getattr(model, name) for name in ARCHITECTURE_FIELDS}
    values["num_kv_heads"] = model.num_kv_heads or model.num_heads  # None means one per head
    values["head_dim"] = model.head_dim or model.d_model // model.num_heads
    return values


def check_same_architecture(ckpt: str | Path, model: ModelConfig, *, field: str) -> None:
    """Raises ConfigError naming every architecture field in which `model` differs from the model
    the checkpoint holds (a checkpoint without a model config passes: its tensors are checked by the
    loader)."""
    from olmoe_megatron.config import ConfigError

    try:
        saved = read_model_config(ckpt)
    except CheckpointFormatError:
        return
    before, now = _architecture(saved), _architecture(model)
    changed = [f"model.{k} {before[k]} -> {now[k]}" for k in ARCHITECTURE_FIELDS if before[k] != now[k]]
    if changed:
        raise ConfigError(
            f"{field}: {ckpt} holds another architecture: {', '.join(changed)}; its tensors cannot load into this "
            "model. Use the checkpoint's model (drop those overrides), start without it (another checkpoint.dir), "
            "or convert it first (`olmoe convert upcycle` for more experts)")


def write_model_config(directory: str | Path, model: ModelConfig) -> None:
    (Path(directory) / MODEL_FILE).write_text(dump_yaml(model))


def write_run_config(directory: str | Path, run: Config) -> None:
    """The run config that wrote a training checkpoint (a RunConfig)."""
    (Path(directory) / RUN_FILE).write_text(dump_yaml(run))
