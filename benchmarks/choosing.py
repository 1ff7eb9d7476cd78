"""B7: choosing a method and a rank, measured on the demo's job (docs/guide/choosing.md's table).

The demo's model (transformers' Flax Llama, 2 layers, d=64, bytes of Shakespeare's sonnets), its
targets (the 7 projections and the output head), alpha = 2r, Adam at 1e-2, batches of 8 x 64
tokens in the demo's order. For LoKr and LoHa at a few ranks, and for full fine-tuning: trainable
parameters, the jitted step's time against full fine-tuning's (steps interleaved round by round in
one run, the median of each), and the mean loss of the last 10 of ``--steps`` steps.

    python benchmarks/choosing.py [--steps 300] [--ranks 2,4,8,16]
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lycoris_jax as lj
from lycoris_cli.demo import LENGTH, TARGETS, _batches, _small_llama
from lycoris_jax import pytree


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--ranks", default="2,4,8,16")
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per variant")
    args = parser.parse_args(argv)
    models = _small_llama(0)
    model, params = models.flax_model, models.params
    text = resources.files("lycoris_cli").joinpath("data/sonnets.txt").read_text(encoding="utf-8")
    tokens = models.tokenize(text)
    tx = optax.adam(1e-2)

    def make(kind: str, r: int) -> tuple[Any, Any]:
        """``(trained, step)``: the adapter (or every weight, ``full``) and its jitted Adam step."""
        if kind == "full":
            trained, merged = params, lambda t: t
        else:
            config_cls = lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig
            config = config_cls(r=r, alpha=2 * r, target_modules=[*TARGETS, "lm_head"])
            trained = pytree.init(params, config, key=jax.random.key(0))
            merged = lambda t: pytree.merge(params, t)  # noqa: E731

        def loss(t: Any, batch: jax.Array) -> jax.Array:
            logits = model(batch[:, :-1], params=merged(t)).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        @jax.jit
        def step(t: Any, state: Any, batch: jax.Array) -> tuple:
            value, grads = jax.value_and_grad(loss)(t, batch)
            updates, state = tx.update(grads, state, t)
            return optax.apply_updates(t, updates), state, value

        return trained, step

    variants = [("full", 0)] + [(k, int(r)) for k in ("lokr", "loha") for r in args.ranks.split(",")]
    rows = {}
    for kind, r in variants:
        trained, step = make(kind, r)
        state, rng, losses = tx.init(trained), np.random.default_rng(0), []
        for _ in range(args.steps):
            trained, state, value = step(trained, state, jnp.asarray(_batches(tokens, 8, LENGTH, rng)))
            losses.append(float(value))
        count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(trained))
        rows[(kind, r)] = dict(params=count, loss=float(np.mean(losses[-10:])), step=step, trained=trained)
    batch = jnp.asarray(_batches(tokens, 8, LENGTH, np.random.default_rng(1)))
    times = {key: [] for key in rows}
    for _ in range(args.rounds):  # interleaved: every variant sees the same machine state
        for key, row in rows.items():
            state = tx.init(row["trained"])
            start = time.perf_counter()
            jax.block_until_ready(row["step"](row["trained"], state, batch))
            times[key].append(time.perf_counter() - start)
    full = float(np.median(times[("full", 0)]))
    total = rows[("full", 0)]["params"]
    print(f"the demo's job: {args.steps} steps; step time: median of {args.rounds}, interleaved; {jax.devices()[0]}")
    print("| method | r | trainable parameters | of the model | step / full fine-tune step | loss, last 10 steps |")
    print("|---|---|---|---|---|---|")
    for (kind, r), row in rows.items():
        name = "full fine-tune" if kind == "full" else {"lokr": "LoKr", "loha": "LoHa"}[kind]
        ratio = float(np.median(times[(kind, r)])) / full
        print(
            f"| {name} | {r or '-'} | {row['params']:,} | {row['params'] / total:.2%} | {ratio:.2f} | {row['loss']:.3f} |"
        )


if __name__ == "__main__":
    main()
