"""``lycoris-jax demo``: the README's main job, run short, and on a local transformers checkpoint."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import jax
import pytest
import torch

from lycoris_cli import demo
from lycoris_cli.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("method", ["lokr", "loha"])
def test_demo_trains_saves_and_reproduces_in_pytorch(tmp_path, capsys, method):
    assert main(["demo", "--method", method, "--steps", "60", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("real PEFT (PeftModel.from_pretrained, torch)", "lycoris_torch", "Linen transform (unmerged)"):
        assert row in out
    assert "demo OK" in out and "FAILED" not in out
    assert "loss " in out and "(mean of the first 10 steps -> mean of the last 10 steps) over 60 jitted steps" in out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper() and config["r"] == 8
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_demo_runs_on_a_local_checkpoint_with_torch_weights_only(tmp_path, capsys, monkeypatch, model_type):
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
    titles = []
    monkeypatch.setattr(demo, "_plot", lambda losses, path, title: titles.append(title))
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "demo OK" in out
    assert "max_position_embeddings 128 -> 64 for the Flax model" in out  # the positions the demo uses
    arch = "FlaxLlamaForCausalLM" if model_type == "llama" else "FlaxGemmaForCausalLM"
    assert titles == [f"{'lokr' if model_type == 'llama' else 'loha'} r=8 on {arch}"]


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


def test_the_flax_model_gets_only_the_positions_the_demo_uses():
    from transformers import GemmaConfig, LlamaConfig, MistralConfig

    config = MistralConfig()  # transformers' default: 131,072 positions, head_dim 128
    note = demo.cap_positions(config)
    assert config.max_position_embeddings == 256  # 2 * head_dim: the Flax rotary table's last axis
    assert "max_position_embeddings 131,072 -> 256" in note and "(16 GiB)" in note
    config = GemmaConfig()  # head_dim 256
    assert demo.cap_positions(config) and config.max_position_embeddings == 512
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
    assert demo.cap_positions(config) is None and config.max_position_embeddings == 64


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma"])
def test_capped_positions_change_no_weight_and_no_output(model_type):
    import numpy as np
    import transformers

    name = {"llama": "Llama", "mistral": "Mistral", "gemma": "Gemma"}[model_type]
    kw = dict(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    kw |= dict(num_key_value_heads=1, max_position_embeddings=512)
    kw |= {"mistral": {"sliding_window": 16}, "gemma": {"head_dim": 64}}.get(model_type, {})
    config = getattr(transformers, f"{name}Config")(**kw)
    capped = copy.deepcopy(config)
    assert demo.cap_positions(capped) and capped.max_position_embeddings == 128  # 2 * head_dim 64 > 64 tokens
    flax_cls = getattr(transformers, f"Flax{name}ForCausalLM")
    full, small = flax_cls(config, seed=0), flax_cls(capped, seed=0)
    assert jax.tree.map(lambda a: a.shape, full.params) == jax.tree.map(lambda a: a.shape, small.params)
    ids = (np.arange(demo.LENGTH)[None] * 7) % 64
    expected = np.asarray(full(ids, params=full.params).logits)
    np.testing.assert_array_equal(np.asarray(small(ids, params=full.params).logits), expected)


def test_bad_demo_arguments_are_refused_before_anything_heavy_is_imported(tmp_path):
    code = (
        "import sys; from lycoris_cli.cli import main\n"
        f"codes = [main(['demo', *a, '--out', {str(tmp_path / 'out')!r}]) for a in "
        "(['--rank', '0'], ['--steps', '0'], ['--lr', '-1'], ['--model', 'nowhere'])]\n"
        "heavy = sorted({'jax', 'flax', 'torch', 'transformers', 'optax'} & set(sys.modules))\n"
        "assert codes == [2, 2, 2, 2] and not heavy, (codes, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("\n") == 4 and not (tmp_path / "out").exists()
