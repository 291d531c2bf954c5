"""DataConfig validation, the olmoe_mix recipe, the demo corpus, and `olmoe prep` end to end."""

import json

import numpy as np
import pytest
from data_testutil import TINY_EOS_ID, TINY_VOCAB_SIZE, expected_ids, random_documents, write_jsonl

from olmoe_megatron.config import ConfigError
from olmoe_megatron.data.config import DataConfig
from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.mixtures import OLMOE_MIX_0924_ORDER, OLMOE_MIX_0924_TOKENS_B, olmoe_mix
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


def test_olmoe_mix_concatenates_in_olmoes_order_without_weights():
    """OLMoE's config order (algebraic-stack, arxiv, open-web-math, pes2o, starcoder, wiki, DCLM),
    whatever the mapping's order; a source's files in the order given; no weights."""
    assert OLMOE_MIX_0924_ORDER == ("algebraic_stack", "arxiv", "openwebmath", "pes2o", "starcoder",
                                    "wikipedia", "dclm")
    config = olmoe_mix({"dclm": ["d1.npy", "d0.npy"], "wikipedia": "w.npy", "starcoder": "s.npy",
                        "algebraic_stack": ("a.npy",)})
    assert config.paths == ("a.npy", "s.npy", "w.npy", "d1.npy", "d0.npy")
    assert config.weights is None
    assert config.format == "olmo_npy" and config.order == "olmo"
    assert olmoe_mix({"arxiv": "x.npy"}, seed=3, order="megatron").order == "megatron"
    assert sum(OLMOE_MIX_0924_TOKENS_B.values()) == pytest.approx(4068.29)
    with pytest.raises(ConfigError, match=r"unknown source 'c4'"):
        olmoe_mix({"c4": "x"})
    with pytest.raises(ConfigError, match=r"source 'arxiv' has no files"):
        olmoe_mix({"arxiv": []})
    with pytest.raises(ConfigError, match=r"paths= is not a DataConfig override here"):
        olmoe_mix({"arxiv": "x.npy"}, paths=("y.npy",))


def test_olmoe_mix_weights_spread_over_files_by_tokens(tmp_path):
    """A source's weight over its files in proportion to their tokens: .npy size / 2, a Megatron
    prefix's .idx, a manifest's shards."""
    from olmoe_megatron.data.format_conversion import olmo_to_megatron

    def npy(name, num_tokens):
        path = tmp_path / name
        np.full(num_tokens, 7, dtype=np.uint16).tofile(path)
        return str(path)

    paths = {"dclm": [npy("d0.npy", 300), npy("d1.npy", 100)], "arxiv": npy("x.npy", 50),
             "wikipedia": [npy("w0.npy", 10), npy("w1.npy", 30)]}
    config = olmoe_mix(paths, weights="paper_proportions")
    assert config.paths == (paths["arxiv"], *paths["wikipedia"], *paths["dclm"])
    total = 21.1 + 3.69 + 3860.0
    assert config.weights == pytest.approx(
        [21.1 / total, 3.69 / total * 0.25, 3.69 / total * 0.75, 3860.0 / total * 0.75, 3860.0 / total * 0.25])
    custom = olmoe_mix({"arxiv": paths["arxiv"], "wikipedia": paths["wikipedia"]}, weights={"arxiv": 1, "wikipedia": 3})
    assert custom.weights == pytest.approx([0.25, 0.75 * 0.25, 0.75 * 0.75])

    # In OLMo's order each file gets its own window permutation; Megatron's schedule blends them.
    np.full(160, 1, dtype=np.uint16).tofile(tmp_path / "b1.npy")
    np.full(640, 3, dtype=np.uint16).tofile(tmp_path / "b3.npy")
    blend = olmoe_mix({"arxiv": paths["arxiv"], "dclm": [str(tmp_path / "b1.npy"), str(tmp_path / "b3.npy")]},
                      weights={"arxiv": 1, "dclm": 1}, eos_token_id=999, mask_repeated_ngrams=False,
                      cache_dir=str(tmp_path / "cache"))
    dataset = blend.build(seq_length=16, num_samples=200, vocab_size=1000)
    counts = np.bincount([int(dataset[i]["tokens"][0]) for i in range(200)], minlength=8)
    assert (counts[7], counts[1], counts[3]) == (100, 20, 80)

    prefixes = [str(tmp_path / "m0"), str(tmp_path / "m1")]
    olmo_to_megatron(npy("m0.npy", 90), prefixes[0], eos_token_id=7)
    olmo_to_megatron(npy("m1.npy", 30), prefixes[1], eos_token_id=7)
    megatron = olmoe_mix({"starcoder": prefixes}, weights="paper_proportions", format="megatron")
    assert megatron.weights == pytest.approx([0.75, 0.25])

    with pytest.raises(DataError, match=r"olmoe_mix source 'dclm': .*nowhere\.npy: token file does not exist"):
        olmoe_mix({"dclm": [paths["dclm"][0], str(tmp_path / "nowhere.npy")]}, weights="paper_proportions")
    with pytest.raises(ConfigError, match=r"weights has no entry for source 'wikipedia'"):
        olmoe_mix({"arxiv": paths["arxiv"], "wikipedia": paths["wikipedia"]}, weights={"arxiv": 1})
    with pytest.raises(ConfigError, match=r"weights names source 'dclm', which has no paths"):
        olmoe_mix({"arxiv": paths["arxiv"]}, weights={"arxiv": 1, "dclm": 2})
    with pytest.raises(ConfigError, match=r"weights\['arxiv'\]=0.0 must be a positive finite number"):
        olmoe_mix({"arxiv": paths["arxiv"]}, weights={"arxiv": 0})
    with pytest.raises(ConfigError, match=r"weights='tokens' is not a blend"):
        olmoe_mix({"arxiv": paths["arxiv"]}, weights="tokens")


def test_olmoe_mix_order_is_one_pcg64_permutation_over_the_concatenated_windows(tmp_path):
    """A 2-source mix given in the 'wrong' order: sample i is window perm[i] of the files
    concatenated in OLMoE's order (wiki before DCLM), perm = PCG64(seed).permutation, by hand."""
    seq_length, seed, eos = 16, 6198, 999
    rng = np.random.default_rng(0)
    sizes = {"dclm0": 16 * 9 + 5, "dclm1": 16 * 4, "wiki": 16 * 3 + 11}
    arrays = {name: rng.integers(0, eos, size, dtype=np.uint16) for name, size in sizes.items()}
    for name, array in arrays.items():
        array.tofile(tmp_path / f"{name}.npy")
    config = olmoe_mix({"dclm": [str(tmp_path / "dclm0.npy"), str(tmp_path / "dclm1.npy")],
                        "wikipedia": str(tmp_path / "wiki.npy")},
                       seed=seed, eos_token_id=eos, mask_repeated_ngrams=False, cache_dir=str(tmp_path / "cache"))
    concatenated = [arrays["wiki"], arrays["dclm0"], arrays["dclm1"]]
    windows = [a[k * seq_length:(k + 1) * seq_length] for a in concatenated for k in range(len(a) // seq_length)]
    assert len(windows) == 3 + 9 + 4
    permutation = np.random.Generator(np.random.PCG64(seed)).permutation(np.arange(len(windows), dtype=np.uint32))
    dataset = config.build(seq_length=seq_length, num_samples=len(windows), vocab_size=1000)
    for index in range(len(windows)):
        np.testing.assert_array_equal(dataset[index]["tokens"], windows[permutation[index]].astype(np.int64))


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


def test_a_real_scale_run_on_the_demo_corpus_is_refused_naming_data_paths():
    """olmoe_1b_7b without data.paths would read the few-MB demo corpus millions of times."""
    from olmoe_megatron.recipes import get_recipe

    run = get_recipe("olmoe_1b_7b")
    samples = run.train.global_batch_size * 1_220_000
    with pytest.raises(ConfigError, match=r"data.paths is empty, so this run would train on the embedded demo corpus "
                                          r"\(at most 4,000,000 bytes .*read it more than 1,279,262 times\. Give the "
                                          r"run's token files with --data.paths=\[\.\.\.\]"):
        run.data.build(seq_length=run.train.seq_length, num_samples=samples, vocab_size=run.model.padded_vocab_size)
    with pytest.raises(ConfigError, match=r"at most 1000 passes"):  # the bound, not the model size, decides
        DataConfig(demo_corpus=True).build(seq_length=1000, num_samples=4_000_001, vocab_size=50304)
