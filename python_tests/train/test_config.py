"""Config: presets, overrides, and errors that name the field."""

import json

import pytest

from vlcore.train.cli import main
from vlcore.train.params import ConfigError, TrainConfig, help_text, list_presets, load_config


def test_presets_load_and_overrides_apply():
    assert {"default", "clip-b32", "clip-b16", "fiber", "captioner"} <= set(list_presets())
    for name in list_presets():
        load_config(["--preset", name, "--train-data", "x.tar"])
    cfg = load_config(["--lr", "5e-4", "--steps=7", "--compile", "--model-overrides", '{"embed_dim": 32}'])
    assert (cfg.lr, cfg.steps, cfg.compile, cfg.model_overrides) == (5e-4, 7, True, {"embed_dim": 32})
    assert cfg.model == "clip-tiny"  # from the default preset


def test_config_file_then_command_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.1, "steps": 3}))
    cfg = load_config(["--config", str(path), "--steps", "4"])
    assert (cfg.lr, cfg.steps) == (0.1, 4)


@pytest.mark.parametrize("argv, message", [
    (["--lrr", "1"], "unknown config field 'lrr' (did you mean 'lr'?)"),
    (["--steps", "ten"], "config field 'steps': expected int, got 'ten'"),
    (["--steps", "2.5"], "config field 'steps': expected int"),
    (["--lr", "fast"], "config field 'lr': expected float"),
    (["--compile", "maybe"], "config field 'compile': expected bool"),
    (["--model-overrides", "[1]"], "config field 'model_overrides': expected dict"),
    (["--data", "parquet"], "config field 'data': must be one of"),
    (["--batch-size", "0"], "config field 'batch_size': must be positive"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--steps"], "config field 'steps': needs a value"),
    (["steps=3"], "unexpected argument 'steps=3'"),
])
def test_config_errors_name_the_field(argv, message):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    assert message in str(e.value)


def test_bad_field_in_a_config_file_names_file_and_field(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"warmup": 3}))
    with pytest.raises(ConfigError, match=r"config file .*c.json: unknown config field 'warmup' \(did you mean 'warmup_steps'"):
        load_config(["--config", str(path)])


def test_model_errors_and_global_batch_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="model_overrides.*vision_cfg: unknown keys"):
        main(["--model-overrides", '{"vision_cfg": {"wdith": 3}}', "--out-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="'batch_size': 10 must be a multiple of world_size x grad_accum = 1 x 3"):
        main(["--batch-size", "10", "--grad-accum", "3", "--out-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="config field 'tokenizer': model 'ViT-B-32' uses CLIP's BPE; pass --tokenizer"):
        main(["--model", "ViT-B-32", "--out-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="config field 'tome_r'"):
        main(["--tome-r", "eight", "--out-dir", str(tmp_path)])


def test_nvfp4_switch_needs_the_module(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_nvfp4(name, *args, **kwargs):
        if name.startswith("vlcore.nvfp4"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nvfp4)
    with pytest.raises(ConfigError, match="config field 'nvfp4': this vlcore build has no vlcore.nvfp4.convert"):
        main(["--nvfp4", "default", "--out-dir", str(tmp_path)])


def test_help_lists_every_field(capsys):
    text = help_text()
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in text
    main(["--help"])
    assert "--grad-checkpointing" in capsys.readouterr().out
