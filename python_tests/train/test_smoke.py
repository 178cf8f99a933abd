"""The trainer end to end on CPU, as open_clip tests its trainer: ``main([...tiny..., --steps 3])``."""

import json

import pytest
import torch

from vlcore.train.cli import eval_main
from vlcore.train.cli import main

from vlcore.train.params import ConfigError

from .helpers import TINY, read_metrics


def test_tiny_clip_trains_evaluates_checkpoints_and_reports(tmp_path):
    out = tmp_path / "run"
    summary = main(TINY + ["--steps", "3", "--out-dir", str(out), "--tensorboard", "true", "--plot", "true",
                           "--workers", "1"])
    assert summary["steps"] == 3
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "samples_per_s", "final_loss"):
        assert key in summary, key
    assert summary["i2t_chance_R@1"] == pytest.approx(1 / 16)
    assert summary["skipped_samples"] == 0
    assert (out / "checkpoints" / "step_00000003" / "model.safetensors").exists()
    assert (out / "curves.png").stat().st_size > 1000 and (out / "report.txt").exists()
    assert list((out / "tensorboard").iterdir())
    assert json.loads((out / "config.json").read_text())["steps"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)

    # vlcore-eval on the checkpoint reproduces the final evaluation.
    metrics = eval_main(["--checkpoint", str(out)])
    assert metrics["i2t_R@1"] == pytest.approx(summary["i2t_R@1"])
    assert metrics["t2i_R@10"] == pytest.approx(summary["t2i_R@10"])

    # Running again resumes from the final checkpoint: nothing left to train, same metrics.
    again = main(TINY + ["--steps", "3", "--out-dir", str(out)])
    assert again["steps"] == 3 and again["i2t_R@1"] == pytest.approx(summary["i2t_R@1"])


@pytest.mark.parametrize("extra", [
    ["--model", "fiber-tiny"],
    ["--model", "captioner-tiny", "--model-overrides",
     '{"vision_cfg": {"image_size": 16, "patch_size": 4}, "connector_cfg": {"output_hw": [2, 2]}}'],
    ["--tome-r", "1", "--pool", "avg", "--impl", "torch", "--grad-checkpointing", "--grad-accum", "2", "--loss", "siglip"],
])
def test_other_presets_and_switches_train(tmp_path, extra):
    argv = TINY + extra + ["--steps", "2", "--out-dir", str(tmp_path)]
    summary = main(argv)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))
    if "captioner-tiny" in extra:
        assert summary["caption_loss"] > 0
        assert summary["packing_padding_ratio"] == 0.0 and summary["padded_batch_padding_ratio"] > 0
    else:
        assert "i2t_R@1" in summary


def test_grad_checkpointing_gives_the_same_losses(tmp_path):
    plain = main(TINY + ["--steps", "2", "--out-dir", str(tmp_path / "a")])
    recomputed = main(TINY + ["--steps", "2", "--grad-checkpointing", "--out-dir", str(tmp_path / "b")])
    assert recomputed["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)


def test_synthetic_benchmark_mode(tmp_path):
    summary = main(TINY + ["--steps", "2", "--synthetic-benchmark", "--out-dir", str(tmp_path)])
    assert summary["samples_per_s"] > 0 and "checkpoint" not in summary and "i2t_R@1" not in summary


def test_grad_cache_accumulation_equals_the_full_batch(tmp_path):
    """GradCache over 4 micro-batches gives the full batch's loss and update; plain accumulation does not
    (each micro-batch contrasts only its own samples)."""
    argv = TINY + ["--steps", "3", "--batch-size", "16", "--random-crop", "false"]
    full = main(argv + ["--out-dir", str(tmp_path / "full")])
    cached = main(argv + ["--grad-accum", "4", "--grad-cache", "--out-dir", str(tmp_path / "cached")])
    plain = main(argv + ["--grad-accum", "4", "--out-dir", str(tmp_path / "plain")])
    full_losses, cached_losses = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cached")
    for step in full_losses:
        assert cached_losses[step] == pytest.approx(full_losses[step], rel=1e-5), step
    assert plain["final_loss"] != pytest.approx(full["final_loss"], rel=1e-3)
    with pytest.raises(ConfigError, match="config field 'grad_cache'"):
        main(argv + ["--model", "fiber-tiny", "--grad-cache", "--out-dir", str(tmp_path / "bad")])
