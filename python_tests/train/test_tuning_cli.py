"""Fine-tuning from the command line: ``--init-from`` loads a pre-trained checkpoint before training,
``--peft`` freezes the base and trains only the tuned parameters, both survive resume and ``vlcore-eval``,
and ManagerTower trains like the other fusion models."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlcore.peft import load_peft
from vlcore.train import checkpoint as ckpt
from vlcore.train import cli
from vlcore.train.builders import build_model
from vlcore.train.params import load_config

from .helpers import TINY, assert_one_line, cli_error, read_metrics


def _train(out_dir: Path, *extra: str, steps: int = 2) -> dict:
    return cli.main(TINY + ["--steps", str(steps), "--out-dir", str(out_dir), *extra])


def _weights(out_dir: Path) -> dict:
    return load_file(str(ckpt.latest_checkpoint(out_dir / "checkpoints") / "model.safetensors"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A short vlcore-train run: the checkpoint the fine-tuning tests start from."""
    out_dir = tmp_path_factory.mktemp("pretrain")
    _train(out_dir, "--seed", "5", steps=3)
    return out_dir


def test_init_from_loads_the_source_weights_exactly(pretrained, tmp_path, capsys):
    source = _weights(pretrained)
    step_dir = ckpt.latest_checkpoint(pretrained / "checkpoints")
    # Every form of the path: the checkpoint directory, its model.safetensors, and the run directory.
    for path in (step_dir, step_dir / "model.safetensors", pretrained):
        model, _ = build_model(load_config(TINY + ["--init-from", str(path)]), init_from=str(path))
        loaded = model.state_dict()
        assert set(loaded) == set(source)
        for name, value in source.items():
            assert torch.equal(loaded[name], value), name
    # From the command line: the log names what was loaded, and the run trains from those weights.
    summary = _train(tmp_path / "ft", "--init-from", str(pretrained), "--seed", "1")
    assert summary["steps"] == 2
    assert f"--init-from: loaded {len(source)} tensors from a vlcore checkpoint" in capsys.readouterr().out
    scratch = _train(tmp_path / "scratch", "--seed", "1")
    # the same seed and data: only the starting weights differ, so the first losses must too
    assert read_metrics(tmp_path / "ft")[1] != read_metrics(tmp_path / "scratch")[1]
    assert scratch["steps"] == 2


def test_a_resumed_run_ignores_init_from_and_says_so(pretrained, tmp_path, capsys):
    out_dir = tmp_path / "run"
    _train(out_dir, "--init-from", str(pretrained), "--checkpoint-every", "1")
    first = _weights(out_dir)
    capsys.readouterr()
    _train(out_dir, "--init-from", str(pretrained), steps=3)  # continues from step 2, not from the source
    out = capsys.readouterr().out
    assert "--init-from" in out and "ignored: resuming from" in out and "loaded" not in out.split("resumed from")[0]
    assert "resumed from" in out and set(read_metrics(out_dir)) == {1, 2, 3}
    assert set(first) == set(_weights(out_dir))


def test_bad_init_from_is_one_line_naming_the_field(pretrained, tmp_path, monkeypatch, capsys):
    code, err = cli_error(monkeypatch, capsys, TINY + ["--steps", "1", "--out-dir", str(tmp_path / "a"),
                          "--init-from", str(tmp_path / "missing")])
    assert_one_line(err)
    assert code == 2 and "init_from" in err and "does not exist" in err
    # weights of another architecture
    code, err = cli_error(monkeypatch, capsys, TINY + ["--steps", "1", "--out-dir", str(tmp_path / "b"), "--model",
                          "fiber-tiny", "--init-from", str(pretrained)])
    assert_one_line(err)
    assert code == 2 and "init_from" in err
    # a file that is not a checkpoint
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    code, err = cli_error(monkeypatch, capsys, TINY + ["--steps", "1", "--out-dir", str(tmp_path / "c"),
                          "--init-from", str(junk)])
    assert_one_line(err)
    assert code == 2 and "init_from" in err


@pytest.mark.parametrize("method, options", [("lora", {"rank": 4, "alpha": 8}), ("adapter", {"reduction": 4}),
                                             ("vl_pet", {"granularity": "middle_x", "reduction": 4})])
def test_peft_trains_only_the_tuned_parameters(method, options, pretrained, tmp_path, capsys):
    source = _weights(pretrained)
    out_dir = tmp_path / method
    summary = _train(out_dir, "--init-from", str(pretrained), "--peft", method, "--peft-options", json.dumps(options),
                     "--lr", "1e-2", steps=3)
    assert f"--peft: {method}:" in capsys.readouterr().out
    tuned = _weights(out_dir)
    added = set(tuned) - set(source)
    assert added, "the tuned modules are in the full checkpoint"
    norms = {n for n in source if ".ln" in n or "norm" in n}  # LayerNorms train with the adapter methods
    for name, value in source.items():
        if method == "lora" or name not in norms:
            assert torch.equal(tuned[name], value), f"{name} is frozen but changed"
    assert any(not torch.equal(tuned[n], torch.zeros_like(tuned[n])) for n in added if "up" in n or "lora_B" in n
               or "gate" in n) or method == "vl_pet"
    # peft.safetensors: the trainable parameters alone, which load_peft applies to a fresh base model
    step_dir = ckpt.latest_checkpoint(out_dir / "checkpoints")
    tuned_only = load_file(str(step_dir / "peft.safetensors"))
    assert 0 < len(tuned_only) < len(tuned)
    fresh, _ = build_model(load_config(TINY))
    fresh.load_state_dict(source, strict=False)
    load_peft(fresh, step_dir / "peft.safetensors")
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, tuned[name]), name
    assert 0 < summary["trainable_fraction"] < 1
    assert "trainable_fraction" in (out_dir / "report.txt").read_text()
    # vlcore-eval re-applies the method from the checkpoint's config before it loads the weights
    metrics = cli.eval_main(["--checkpoint", str(out_dir)])
    for key in ("i2t_R@1", "t2i_R@1"):
        assert metrics[key] == pytest.approx(summary[key])


def test_peft_resume_is_exact(pretrained, tmp_path):
    args = ["--init-from", str(pretrained), "--peft", "adapter", "--checkpoint-every", "3", "--lr", "1e-2"]
    _train(tmp_path / "straight", *args, steps=6)
    reference = read_metrics(tmp_path / "straight")
    _train(tmp_path / "resumed", *args, steps=6)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    import shutil

    shutil.rmtree(checkpoints / "step_00000006")  # as if the run had been killed after step 3's checkpoint
    _train(tmp_path / "resumed", *args, steps=6)
    assert read_metrics(tmp_path / "resumed") == reference
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


@pytest.mark.parametrize("argv, field", [
    (["--peft", "lora", "--nvfp4", "default"], "peft"),
    (["--peft", "lora", "--fsdp"], "peft"),
    (["--peft", "lora", "--peft-options", '{"rnk": 4}'], "peft_options"),
    (["--peft", "lora", "--peft-options", '{"trainable": ["no_such_head"]}'], "peft_options"),
    (["--peft-options", '{"rank": 4}'], "peft_options"),
    (["--peft", "prefix"], "peft"),
])
def test_bad_peft_switches_are_one_line(argv, field, tmp_path, monkeypatch, capsys):
    code, err = cli_error(monkeypatch, capsys, TINY + ["--steps", "1", "--out-dir", str(tmp_path)] + argv)
    assert_one_line(err)
    assert code == 2 and f"'{field}'" in err


def test_managertower_trains_from_the_command_line(tmp_path):
    summary = cli.main(["--preset", "fiber", "--model", "managertower-tiny"] + TINY[4:] +
                       ["--steps", "2", "--out-dir", str(tmp_path)])
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "managertower-tiny"
