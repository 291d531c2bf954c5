"""Checkpoint integrity: every committed checkpoint has a manifest (files, sizes, xxh3 checksums);
`olmoe ckpt verify` checks it and `olmoe ckpt inspect` describes a checkpoint; a resume refuses a
truncated or incomplete checkpoint naming the file (or, opted in, falls back to the newest
complete one); a resume with another architecture is an error naming the fields."""

import json
import shutil
from pathlib import Path

import pytest

from olmoe_megatron.checkpoint import manifest
from olmoe_megatron.checkpoint.format import CheckpointFormatError, check_same_architecture
from olmoe_megatron.checkpoint.plan import plan_load
from olmoe_megatron.config import ConfigError
from olmoe_megatron.config.base import config_to_dict
from olmoe_megatron.launcher.cli import main
from olmoe_megatron.recipes import get_recipe
from olmoe_megatron.run_config import RunConfig
from olmoe_megatron.testing.distributed import get_pool
from olmoe_megatron.testing.training_runs import read_metrics, train_run, write_synthetic_corpus


def _tiny(root: Path, corpus: str, steps: int, **checkpoint) -> dict:
    run = config_to_dict(get_recipe("olmoe_tiny"))
    run["data"].update(paths=[corpus], demo_corpus=False, cache_dir=str(root / "index"))
    run["train"].update(max_steps=steps)
    run["checkpoint"].update(dir=str(root / "ckpt"), save_interval=2, keep_last=0, **checkpoint)
    run["metrics"].update(jsonl=str(root / "metrics.jsonl"))
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """olmoe_tiny on one rank, 4 steps, saved at steps 2 and 4: (root, corpus)."""
    root = tmp_path_factory.mktemp("integrity")
    corpus = write_synthetic_corpus(root / "corpus")
    assert get_pool(1).run(train_run, _tiny(root, corpus, 4)) == [0]
    return root, corpus


def _copy(trained, tmp_path) -> Path:
    root, _ = trained
    shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_every_committed_checkpoint_has_a_complete_manifest(trained):
    root, _ = trained
    for step in ("step_0000002", "step_0000004"):
        body = json.loads((root / "ckpt" / step / manifest.MANIFEST_FILE).read_text())
        names = set(body["files"])
        assert {"common.pt", ".metadata", "metadata.json", "olmoe_run.yaml", "olmoe_model.yaml",
                "rng/rank_00000.pt"} <= names
        assert any(n.endswith(".distcp") for n in names)
        assert names == set(manifest.list_files(root / "ckpt" / step))  # nothing left out
        assert body["step"] == int(step[5:]) and body["total_bytes"] == sum(f["size"] for f in body["files"].values())
        assert manifest.verify(root / "ckpt" / step)[1] == []


def test_verify_names_each_damaged_file(trained, tmp_path, capsys):
    ckpt = _copy(trained, tmp_path)
    assert main(["ckpt", "verify", str(ckpt), "--all"]) == 0
    assert capsys.readouterr().out.count(": OK (") == 2
    step = ckpt / "step_0000004"
    distcp = sorted(step.glob("*.distcp"))[0]
    data = bytearray(distcp.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, another checksum
    distcp.write_bytes(bytes(data))
    (step / "common.pt").write_bytes((step / "common.pt").read_bytes()[:-10])
    (step / "rng" / "rank_00000.pt").unlink()
    (step / "stray.txt").write_text("x")
    assert main(["ckpt", "verify", str(ckpt)]) == 1  # follows latest (step 4)
    out = capsys.readouterr().out
    assert f"{step}: FAILED" in out
    assert f"{distcp} has changed: xxh3_64" in out
    assert f"{step / 'common.pt'} is truncated:" in out
    assert f"{step / 'rng' / 'rank_00000.pt'} is missing" in out
    assert f"{step / 'stray.txt'} is not in the manifest" in out
    assert main(["ckpt", "verify", str(ckpt / "step_0000002")]) == 0
    (ckpt / "step_0000002" / manifest.MANIFEST_FILE).write_text('{"version": 1, "files": ')
    assert main(["ckpt", "verify", str(ckpt / "step_0000002")]) == 2
    assert "cannot be read as a manifest" in capsys.readouterr().err
    assert main(["ckpt", "verify", str(tmp_path / "nowhere")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err


def test_inspect_describes_step_tokens_layout_and_model(trained, capsys):
    root, _ = trained
    assert main(["ckpt", "inspect", str(root / "ckpt"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    model = get_recipe("olmoe_tiny").model
    assert d["path"] == str(root / "ckpt" / "step_0000004") and d["kind"] == "training"
    assert d["progress"] == {"step": 4, "consumed_samples": 32, "tokens": 4 * 8 * 32, "nonfinite_streak": 0}
    assert d["saved_layout"]["world_size"] == 1 and d["saved_layout"]["expert_parallel"] == 1
    assert d["saved_layout"]["data_parallel"] == 1 and d["dtype"] == "fp32" and d["run"] == "olmoe_tiny"
    assert d["model"] == config_to_dict(model) and d["parameters"] == model.num_params()
    assert d["manifest"]["files"] == d["files"] and d["manifest"]["bytes"] == d["bytes"] > 1 << 20
    assert main(["ckpt", "inspect", str(root / "ckpt" / "step_0000002")]) == 0
    text = capsys.readouterr().out
    assert "progress    step 2, 512 tokens, 16 samples" in text
    assert "4 layers, d_model 64, 4 heads, 8 experts top-2, vocab 50280 (padded 50304), fp32" in text


def test_a_resume_refuses_a_truncated_checkpoint_or_falls_back_when_asked(trained, tmp_path):
    root, corpus = trained
    ckpt = _copy(trained, tmp_path)
    distcp = sorted((ckpt / "step_0000004").glob("*.distcp"))[0]
    distcp.write_bytes(distcp.read_bytes()[:100])
    run = _tiny(tmp_path, corpus, 6)
    with pytest.raises(CheckpointFormatError, match=rf"checkpoint.load: checkpoint {ckpt / 'step_0000004'} is "
                                                    rf"incomplete: {distcp} is truncated: 100 bytes.*"
                                                    r"--checkpoint.fallback_to_complete=true"):
        plan_load(RunConfig.from_dict(run).checkpoint)
    run["checkpoint"]["fallback_to_complete"] = True
    plan = plan_load(RunConfig.from_dict(run).checkpoint)
    assert plan.path == ckpt / "step_0000002" and "newest complete" in plan.reason
    assert get_pool(1).run(train_run, run) == [0]  # resumes at step 3
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [3, 4, 5, 6]
    assert (ckpt / "latest").read_text().strip() == "step_0000006"
    ref = {r["step"]: r["lm_loss"] for r in read_metrics(root / "metrics.jsonl")}
    got = {r["step"]: r["lm_loss"] for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert got[3] == ref[3] and got[4] == ref[4]  # the same steps as the run that saved it

    assert manifest.check_sizes(ckpt / "step_0000004") == []  # saved again by the resumed run
    for step in ("step_0000002", "step_0000004", "step_0000006"):
        (ckpt / step / "common.pt").unlink()
    with pytest.raises(CheckpointFormatError, match=r"no complete checkpoint is left"):
        plan_load(RunConfig.from_dict(run).checkpoint)


def test_a_resume_with_another_architecture_names_the_fields(trained, tmp_path):
    root, corpus = trained
    run = _tiny(tmp_path, corpus, 6)  # the trainer checks before it builds the model
    run["checkpoint"]["load"] = str(root / "ckpt")
    run["model"]["num_layers"] = 3
    with pytest.raises(Exception, match=r"checkpoint.load: .*step_0000004 holds another architecture: "
                                        r"model.num_layers 4 -> 3;"):
        get_pool(1).run(train_run, run)
    step = root / "ckpt" / "step_0000004"
    model = get_recipe("olmoe_tiny").model
    check_same_architecture(step, model, field="checkpoint.load")
    check_same_architecture(step, model.replace(router_z_loss_coeff=0.0, rope_theta=5e5), field="checkpoint.load")
    with pytest.raises(ConfigError, match=r"checkpoint.load: .*step_0000004 holds another architecture: "
                                          r"model.d_model 64 -> 128, model.head_dim 16 -> 32, model.num_experts 8 -> 16; "):
        check_same_architecture(step, model.replace(d_model=128, num_experts=16), field="checkpoint.load")
    with pytest.raises(ConfigError, match=r"model.num_layers 4 -> 2"):
        check_same_architecture(step, model.replace(num_layers=2), field="checkpoint.init_from")


def test_manifest_files_alone(tmp_path):
    """The manifest functions on a plain directory: sizes pass/fail, checksum changes, bad manifests."""
    d = tmp_path / "step_0000001"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"a" * 1000)
    (d / "sub" / "b").write_bytes(b"")
    manifest.write_manifest_for(d, step=1)
    assert manifest.check_sizes(d) == [] and manifest.verify(d)[1] == []
    assert manifest.newest_complete(tmp_path) == d
    (d / "a.bin").write_bytes(b"b" * 1000)
    assert manifest.check_sizes(d) == [] and len(manifest.verify(d)[1]) == 1
    (d / "sub" / "b").write_bytes(b"more")
    assert manifest.check_sizes(d) == [f"{d / 'sub' / 'b'} is longer than written: 4 bytes, the manifest says 0"]
    assert manifest.newest_complete(tmp_path) is None
    (d / manifest.MANIFEST_FILE).write_text(json.dumps({"version": 1, "files": {"a.bin": {"size": "10"}}}))
    with pytest.raises(CheckpointFormatError, match="is not a version-1 manifest"):
        manifest.check_sizes(d)
    (d / manifest.MANIFEST_FILE).unlink()  # no manifest: the dist checkpoint's own files must be there
    assert manifest.check_sizes(d) == [f"{d / n} is missing" for n in (".metadata", "common.pt", "metadata.json")]
    assert manifest.verify(d)[0] is None and "cannot be checked" in manifest.verify(d)[1][0]
