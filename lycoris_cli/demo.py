"""``lycoris-jax demo``: fine-tune a LyCORIS adapter on a transformers Flax Llama, then load it in PyTorch.

1. Build ``LlamaForCausalLM`` from a small config (random weights, seeded) and the Flax
   ``FlaxLlamaForCausalLM`` holding the same weights (or load both from ``--model PATH``, a local
   Llama, Gemma or Mistral checkpoint).
2. Train a LoKr (or LoHa) adapter with the params-pytree API under ``jax.jit`` (optax Adam) on
   Shakespeare's sonnets shipped with the package, as byte-level tokens (no download).
3. Save PEFT's files, load them with real PEFT and with ``lycoris_torch`` onto the torch model, and
   with the Linen transform (PEFT's unmerged forward) onto the Flax model; print a table of the
   largest logit differences; write a loss-curve PNG.

Exits 1 if the loss does not fall or any framework disagrees beyond the tolerance.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

__all__ = ["add_arguments", "main", "run"]

#: Largest logit difference accepted between frameworks (fp32; logits of magnitude ~1-10).
TOLERANCE = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Tokens per training sequence (batches of 8) and per evaluation sequence (2): the positions the demo uses.
LENGTH, EVAL_LENGTH = 64, 32
#: ``model_type`` of the checkpoints ``--model`` takes, and their names.
MODEL_TYPES = {"llama": "Llama", "gemma": "Gemma", "mistral": "Mistral"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=["lokr", "loha"], default="lokr", help="adapter type (default: lokr)")
    parser.add_argument("--rank", type=int, default=8, help="r (default: 8)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--out", default="demo_output", help="directory for the adapter and loss.png")
    parser.add_argument(
        "--model",
        default=None,
        help="a local transformers Llama, Gemma or Mistral checkpoint directory (config.json and torch or Flax "
        "weights; torch weights are converted); default: a small random Llama",
    )
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default: 1e-2)")
    parser.add_argument("--seed", type=int, default=0)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse unusable arguments (``ValueError``, one line) before anything heavy is imported or built."""
    for flag, value in (("--steps", args.steps), ("--rank", args.rank)):
        if value < 1:
            raise ValueError(f"{flag}: expected a positive integer, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr: expected a positive finite learning rate, got {args.lr}")
    if args.seed < 0:
        raise ValueError(f"--seed: expected a non-negative integer, got {args.seed}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r}: exists and is not a directory; name a directory for the results")
    if args.model is not None:
        _check_model_directory(args.model)


def _check_model_directory(path: str) -> None:
    """A directory with a config.json whose ``model_type`` is one of :data:`MODEL_TYPES`."""
    from lycoris_cli import read_model_config

    data = read_model_config(path, "a local transformers Llama, Gemma or Mistral checkpoint directory")
    model_type = data.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"--model {path!r}: expected a Llama, Gemma or Mistral checkpoint, got model_type {model_type!r} in config.json"
        )


def cap_positions(config: Any, length: int = LENGTH) -> str | None:
    """Lower ``config.max_position_embeddings`` in place to what the demo needs; the note to print, or None.

    transformers' Flax Llama, Gemma and Mistral build a ``max_position_embeddings``² causal mask at
    init (131,072 in Mistral's default config: 16 GiB) and slice their rotary table's last axis to
    ``max_position_embeddings`` (so it stays at least ``2 * head_dim``). Below the cap every position
    computes what it did before; no weight depends on it.
    """
    head_dim = max(getattr(config, "head_dim", None) or 0, config.hidden_size // config.num_attention_heads)
    cap = max(length, 2 * head_dim)
    before = config.max_position_embeddings
    if before <= cap:
        return None
    config.max_position_embeddings = cap
    return (
        f"max_position_embeddings {before:,} -> {cap} for the Flax model: the demo's sequences are {length} tokens "
        f"and transformers' Flax model would build a {before:,}² causal mask ({before**2 / 2**30:.3g} GiB) at init; "
        "outputs at these positions are unchanged"
    )


@dataclass
class Models:
    torch_model: Any  # a factory: fresh torch model with the base weights
    flax_model: Any
    params: Any
    vocab: int
    tokenize: Any
    name: str  # the Flax architecture, e.g. FlaxGemmaForCausalLM


def _small_llama(seed: int) -> Models:
    import torch
    from transformers import FlaxLlamaForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    flax_model = FlaxLlamaForCausalLM(config, seed=seed)
    params = convert_pytorch_state_dict_to_flax({k: v.clone() for k, v in state.items()}, flax_model)

    def torch_model() -> Any:
        model = LlamaForCausalLM(config).eval()
        model.load_state_dict(state)
        return model

    tokenize = lambda text: np.frombuffer(text.encode(), np.uint8)  # noqa: E731
    return Models(torch_model, flax_model, params, 256, tokenize, type(flax_model).__name__)


def _local_model(path: str) -> Models:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, FlaxAutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)  # check_arguments has seen config.json and its model_type
    note = cap_positions(config)
    if note:
        print(note)
    has_flax = os.path.isfile(os.path.join(path, "flax_model.msgpack"))
    flax_model = FlaxAutoModelForCausalLM.from_pretrained(path, config=config, from_pt=not has_flax)
    if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenize = lambda text: np.asarray(tokenizer(text)["input_ids"])  # noqa: E731
    else:  # no tokenizer files: bytes, folded into the vocabulary
        tokenize = lambda text: np.frombuffer(text.encode(), np.uint8).astype(np.int64) % config.vocab_size  # noqa: E731
    return Models(
        lambda: AutoModelForCausalLM.from_pretrained(path).eval(),
        flax_model,
        flax_model.params,
        config.vocab_size,
        tokenize,
        type(flax_model).__name__,
    )


def _batches(tokens: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    starts = rng.integers(0, len(tokens) - length - 1, size=batch)
    return np.stack([tokens[s : s + length + 1] for s in starts]).astype(np.int32)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    from tqdm.auto import tqdm

    import lycoris_jax as lj
    import lycoris_torch as lt
    from lycoris_jax import linen, pytree

    start = time.perf_counter()
    models = _local_model(args.model) if args.model else _small_llama(args.seed)
    text = resources.files("lycoris_cli").joinpath("data/sonnets.txt").read_text(encoding="utf-8")
    tokens = models.tokenize(text)
    config_cls = lj.LoKrConfig if args.method == "lokr" else lj.LoHaConfig
    # The output projection too, unless it is tied to the embeddings (Gemma): then Flax has no kernel
    # for it while torch has a module, and the two would plan different adapters.
    targets = TARGETS + (["lm_head"] if "lm_head" in models.params else [])
    config = config_cls(r=args.rank, alpha=2 * args.rank, target_modules=targets)
    adapter = pytree.init(models.params, config, key=jax.random.key(args.seed))
    params, model = models.params, models.flax_model
    n_factors = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(adapter))
    n_base = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    print(
        f"{args.method} r={args.rank} on {len(adapter.factors)} projections of {models.name}: "
        f"{n_factors:,} trainable parameters "
        f"({100 * n_factors / n_base:.2f}% of {n_base:,}); {len(tokens):,} tokens of Shakespeare"
    )

    def loss_fn(a: Any, batch: jax.Array) -> jax.Array:
        logits = model(batch[:, :-1], params=pytree.merge(params, a)).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    tx = optax.adam(args.lr)
    opt_state = tx.init(adapter)

    @jax.jit
    def step(a: Any, state: Any, batch: jax.Array) -> tuple[Any, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss_fn)(a, batch)
        updates, state = tx.update(grads, state, a)
        return optax.apply_updates(a, updates), state, value

    rng = np.random.default_rng(args.seed)
    losses: list[float] = []
    bar = tqdm(range(args.steps), desc=f"training {args.method}", unit="step", file=sys.stderr, mininterval=1.0)
    for _ in bar:
        adapter, opt_state, value = step(adapter, opt_state, jnp.asarray(_batches(tokens, 8, LENGTH, rng)))
        losses.append(float(value))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    train_time = time.perf_counter() - start
    window = max(1, min(10, len(losses) // 4))
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    steps = "step" if window == 1 else f"{window} steps"
    print(
        f"loss {first:.3f} -> {last:.3f} (mean of the first {steps} -> mean of the last {steps}) "
        f"over {args.steps} jitted steps"
    )

    os.makedirs(args.out, exist_ok=True)
    adapter_dir = os.path.join(args.out, "adapter")
    pytree.save_pretrained(adapter, adapter_dir)
    _plot(losses, os.path.join(args.out, "loss.png"), f"{args.method} r={args.rank} on {models.name}")

    ids = _batches(tokens, 2, EVAL_LENGTH, np.random.default_rng(args.seed + 1))
    expected = np.asarray(model(jnp.asarray(ids), params=pytree.merge(params, adapter)).logits)
    mask, positions = jnp.ones(ids.shape, jnp.int32), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    adapted, lycoris = linen.from_pretrained(adapter_dir, model.module, params)
    unmerged = np.asarray(
        adapted.apply({"params": params, "lycoris": lycoris}, jnp.asarray(ids), mask, positions).logits
    )

    def torch_logits(m: Any) -> np.ndarray:
        with torch.no_grad():
            return m(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()

    import peft

    rows = [
        (
            "real PEFT (PeftModel.from_pretrained, torch)",
            torch_logits(peft.PeftModel.from_pretrained(models.torch_model(), adapter_dir).eval()),
        ),
        (
            "lycoris_torch (LycorisTuner.from_pretrained)",
            torch_logits(lt.LycorisTuner.from_pretrained(models.torch_model(), adapter_dir)),
        ),
        ("lycoris_jax Linen transform (unmerged)", unmerged),
    ]
    print(f"\nmax |logits - lycoris_jax merged logits| (|logits| up to {np.abs(expected).max():.1f}):")
    worst = 0.0
    for name, got in rows:
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        print(f"  {name:<48} {diff:.2e}  {'ok' if diff <= TOLERANCE else 'FAILED'}")
    print(f"\nadapter: {adapter_dir} (PEFT files); loss curve: {os.path.join(args.out, 'loss.png')}")
    print(f"total {time.perf_counter() - start:.0f}s (training and setup {train_time:.0f}s)")
    failed = []
    if not last < first - 0.05:  # nats per token, the mean of the first and of the last few steps
        failed.append(f"the loss did not fall ({first:.3f} -> {last:.3f})")
    if worst > TOLERANCE:
        failed.append(f"frameworks disagree by {worst:.2e} > {TOLERANCE:.0e}")
    if failed:
        print("demo FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    print("demo OK: trained in JAX; real PEFT, lycoris_torch and the Linen transform reproduce it")
    return 0


def _plot(losses: Sequence[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1.2)
    ax.set(xlabel="step", ylabel="cross-entropy (nats per token)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lycoris-jax demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
