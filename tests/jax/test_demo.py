"""``lycoris-jax demo``: the README's main job, run short, and on a local transformers checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lycoris_cli.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("method", ["lokr", "loha"])
def test_demo_trains_saves_and_reproduces_in_pytorch(tmp_path, capsys, method):
    assert main(["demo", "--method", method, "--steps", "60", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("real PEFT (PeftModel.from_pretrained, torch)", "lycoris_torch", "Linen transform (unmerged)"):
        assert row in out
    assert "demo OK" in out and "FAILED" not in out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper() and config["r"] == 8
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_demo_runs_on_a_local_checkpoint_with_torch_weights_only(tmp_path, capsys, model_type):
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    kw |= dict(num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if model_type == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    else:
        model = GemmaForCausalLM(GemmaConfig(**kw, head_dim=8))
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "flax_model.msgpack").exists()
    # Gemma ties lm_head to the embeddings (no adapter there) and a random one learns slowly: more steps
    steps = ["--steps", "40"] if model_type == "llama" else ["--method", "loha", "--steps", "150", "--lr", "3e-2"]
    args = ["demo", "--model", str(tmp_path / "ckpt"), *steps, "--out", str(tmp_path / "out")]
    assert main(args) == 0, capsys.readouterr().err
    assert "demo OK" in capsys.readouterr().out


def test_bad_usage_and_unusable_input_exit_2(tmp_path):
    env = os.environ | {"JAX_PLATFORMS": "cpu"}

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "lycoris_cli", *args], cwd=ROOT, env=env, capture_output=True, text=True
        )

    assert run("demo", "--method", "lora").returncode == 2
    assert run().returncode == 2
    missing = run("demo", "--model", str(tmp_path / "nope"), "--steps", "1")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "lycoris-jax demo:" in missing.stderr
    assert "demo" in run("--help").stdout and "--method" in run("demo", "--help").stdout
