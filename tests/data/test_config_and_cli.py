"""DataConfig validation, the olmoe_mix recipe, the demo corpus, and `olmoe prep` end to end."""

import json

import numpy as np
import pytest
from data_testutil import TINY_EOS_ID, TINY_VOCAB_SIZE, expected_ids, random_documents, write_jsonl

from olmoe_megatron.config import ConfigError
from olmoe_megatron.data.config import DataConfig
from olmoe_megatron.data.mixtures import OLMOE_MIX_0924_TOKENS_B, olmoe_mix
from olmoe_megatron.launcher.cli import main


def test_data_config_errors_name_field_and_fix():
    with pytest.raises(ConfigError, match=r"data.paths is empty .* data.demo_corpus=true"):
        DataConfig()
    with pytest.raises(ConfigError, match=r"data.weights has 1 entries but data.paths has 2"):
        DataConfig(paths=("a", "b"), weights=(1.0,))
    with pytest.raises(ConfigError, match=r"every weight must be a positive finite number"):
        DataConfig(paths=("a",), weights=(0.0,))
    with pytest.raises(ConfigError, match=r"unknown config key 'paht'"):
        DataConfig.from_dict({"paht": ["a"]})
    config = DataConfig.from_dict({"paths": ["a", "b"], "weights": [1, 3], "order": "olmo"})
    assert config.weights == (1.0, 3.0) and config.with_overrides(["seed=3"]).seed == 3


def test_olmoe_mix_uses_the_paper_proportions():
    config = olmoe_mix({"dclm": ["d0.npy", "d1.npy"], "starcoder": "s.npy", "wikipedia": "w.npy"})
    assert config.paths == ("d0.npy", "d1.npy", "s.npy", "w.npy")
    assert config.weights == (1930.0, 1930.0, 101.0, 3.69)
    assert config.format == "olmo_npy" and config.order == "olmo"
    assert sum(OLMOE_MIX_0924_TOKENS_B.values()) == pytest.approx(4068.29)
    with pytest.raises(ConfigError, match=r"unknown source 'c4'"):
        olmoe_mix({"c4": "x"})


def test_demo_corpus_is_built_once_and_trains(tmp_path, tiny_tokenizer):
    from olmoe_megatron.data.corpus import build_demo_corpus, stdlib_source_files

    manifest = build_demo_corpus(tmp_path, tokenizer_path=tiny_tokenizer, max_bytes=200_000)
    stamp = manifest.stat().st_mtime_ns
    assert build_demo_corpus(tmp_path, tokenizer_path=tiny_tokenizer, max_bytes=200_000) == manifest
    assert manifest.stat().st_mtime_ns == stamp
    summary = json.loads(manifest.read_text())
    assert summary["documents"] == len(stdlib_source_files(200_000))
    files = stdlib_source_files(200_000)
    assert [f.name for f in files] == [json.loads(l)["path"] for l in open(manifest.with_name(manifest.name.replace(".manifest.json", ".jsonl")))]
    config = DataConfig(demo_corpus=True, tokenizer=tiny_tokenizer, demo_max_bytes=200_000, eos_token_id=TINY_EOS_ID,
                        cache_dir=str(tmp_path / "cache"))
    dataset = config.build(seq_length=64, num_samples=20, vocab_size=TINY_VOCAB_SIZE)
    assert dataset[3]["tokens"].shape == (64,)


def test_prep_cli_tokenize_convert_and_zarr(tmp_path, tiny_tokenizer, capsys):
    documents = random_documents(20, seed=9)
    source = write_jsonl(tmp_path / "a.jsonl", documents)
    prefix = str(tmp_path / "tok" / "c")
    assert main(["prep", "tokenize", source, "-o", prefix, "--tokenizer", tiny_tokenizer, "--workers", "1"]) == 0
    assert "20 documents" in capsys.readouterr().out
    assert main(["prep", "convert", "--to", "olmo", f"{prefix}_00000", str(tmp_path / "c.npy"),
                 "--eos-id", str(TINY_EOS_ID)]) == 0
    assert np.fromfile(tmp_path / "c.npy", dtype=np.uint16).tolist() == sum(expected_ids(documents), [])
    assert main(["prep", "zarr-pack", f"{prefix}_00000", "-o", str(tmp_path / "a.zarr")]) == 0
    assert main(["prep", "zarr-unpack", str(tmp_path / "a.zarr"), "-o", str(tmp_path / "un")]) == 0
    assert (tmp_path / "un" / "c_00000.bin").read_bytes() == (tmp_path / "tok" / "c_00000.bin").read_bytes()
    assert main(["prep", "tokenize", str(tmp_path / "missing.jsonl"), "-o", prefix, "--tokenizer", tiny_tokenizer]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
