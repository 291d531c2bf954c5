"""Streaming access to an HF checkpoint directory: config.json, safetensors shards, tokenizer files.

`HFReader` reads tensors key by key, opening each shard only while a layer is read (an open
safetensors mmap would keep every page it touched resident), so reading a model costs one layer
of memory. `HFShardWriter` writes one shard per call plus, at the end, the index json that
`from_pretrained` reads.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from olmoe_megatron.convert.errors import ConversionError, list_keys

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: Files copied along with the weights (tokenizer and generation settings), when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "generation_config.json",
)
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class HFReader:
    """An HF checkpoint directory: its config.json and where each tensor lives."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{config_path} does not exist: --hf must be a save_pretrained directory")
        try:
            self.config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{config_path} is not valid JSON: {exc}") from None
        self.files = self._weight_files()
        self.key_file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for path in self.files:
            with self._open(path) as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    self.key_file[key] = path
                    self.shapes[key] = tuple(piece.get_shape())
                    self.dtypes[key] = _DTYPES.get(piece.get_dtype(), piece.get_dtype())

    def _weight_files(self) -> list[Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ConversionError(f"{index} is not a safetensors index (no weight_map): {exc}") from None
            files = sorted({self.directory / name for name in weight_map.values()})
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise ConversionError(f"{index} names shards that do not exist: {list_keys(missing)}")
            return files
        if (self.directory / SINGLE_FILE).is_file():
            return [self.directory / SINGLE_FILE]
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = f" (found {', '.join(bins)}: re-save with safe_serialization=True)" if bins else ""
            raise ConversionError(f"no *.safetensors files in {self.directory}{hint}")
        return files

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise ConversionError(
                f"cannot read {path}: {exc} (a truncated or corrupt safetensors file; copy it again)"
            ) from None

    def read(self, keys) -> dict[str, torch.Tensor]:
        """The tensors of `keys`, each shard opened once and closed again."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.key_file[key]].append(key)
        out = {}
        for path, names in by_file.items():
            with self._open(path) as f:
                for key in names:
                    try:
                        out[key] = f.get_tensor(key)
                    except SafetensorError as exc:
                        raise ConversionError(f"cannot read {key} from {path}: {exc}") from None
        return out

    def copy_tokenizer(self, target: Path) -> list[str]:
        return copy_tokenizer_files(self.directory, target)


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copies the tokenizer files present in `source` into `target`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(source) / name, target / name)
            copied.append(name)
    return copied


class HFShardWriter:
    """Writes safetensors shards one at a time, then the index json."""

    def __init__(self, directory: Path, *, num_shards: int):
        self.directory = directory
        self.num_shards = num_shards
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        self._written += 1
        name = f"model-{self._written:05d}-of-{self.num_shards:05d}.safetensors"
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.directory / name), metadata={"format": "pt"})
        for key, value in tensors.items():
            self.weight_map[key] = name
            self.total_bytes += value.numel() * value.element_size()

    def finish(self) -> None:
        assert self._written == self.num_shards, (self._written, self.num_shards)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
