"""Train-step cost of LoKr/LoHa adapters relative to the frozen-base step, in lycoris_jax and PEFT.

The frozen-base step is forward + backward through the frozen model (activation gradients only):
the floor any adapter step pays. The full fine-tune step trains every base weight with Adam.
Ratios are measured side by side in one run on the same machine:

    python benchmarks/train_step.py [--dim 1024] [--layers 4] [--batch 256] [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import jax
import jax.numpy as jnp
import optax
import torch
from flax import nnx
from torch import nn

import lycoris_jax as lj

CONFIGS = {"lokr": dict(r=8, alpha=8), "loha": dict(r=8, alpha=8)}


class JaxMLP(nnx.Module):
    def __init__(self, dim: int, layers: int) -> None:
        self.layers = nnx.List([nnx.Linear(dim, dim, rngs=nnx.Rngs(i)) for i in range(layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return x


def _time(fn, steps: int) -> float:
    fn()  # compile / warm up
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def jax_times(dim: int, layers: int, batch: int, steps: int) -> dict[str, float]:
    x = jax.random.normal(jax.random.key(0), (batch, dim))
    out: dict[str, float] = {}

    model = JaxMLP(dim, layers)
    frozen = nnx.jit(lambda m, x: jax.grad(lambda x: (m(x) ** 2).mean())(x))
    out["frozen"] = _time(lambda: jax.block_until_ready(frozen(model, x)), steps)

    full_opt = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)

    @nnx.jit
    def full_step(m, o, x):
        grads = nnx.grad(lambda m: (m(x) ** 2).mean())(m)
        o.update(m, grads)

    out["full"] = _time(
        lambda: (full_step(model, full_opt, x), jax.block_until_ready(model.layers[0].kernel[...])), steps
    )

    for kind, kw in CONFIGS.items():
        cfg_cls, tuner_cls = (lj.LoKrConfig, lj.LoKrModel) if kind == "lokr" else (lj.LoHaConfig, lj.LoHaModel)
        tuner = tuner_cls(JaxMLP(dim, layers), cfg_cls(target_modules=r".*layers\.\d+", **kw))
        opt = nnx.Optimizer(tuner, optax.adam(1e-4), wrt=lj.LycorisParam)

        @nnx.jit
        def step(t, o, x):
            grads = nnx.grad(lambda t: (t(x) ** 2).mean(), argnums=nnx.DiffState(0, lj.LycorisParam))(t)
            o.update(t, grads)

        probe = next(iter(tuner.model.layers[0].factors["default"].values()))

        def run(step=step, tuner=tuner, opt=opt, probe=probe) -> None:
            step(tuner, opt, x)
            jax.block_until_ready(probe[...])

        out[kind] = _time(run, steps)
    return out


def peft_times(dim: int, layers: int, batch: int, steps: int) -> dict[str, float]:
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(dim, dim), nn.Tanh())])
    x = torch.randn(batch, dim)
    out: dict[str, float] = {}

    frozen = copy.deepcopy(base).requires_grad_(False)

    def frozen_step():
        xi = x.clone().requires_grad_(True)
        (frozen(xi) ** 2).mean().backward()

    out["frozen"] = _time(frozen_step, steps)
    full = copy.deepcopy(base)
    full_opt = torch.optim.Adam(full.parameters(), lr=1e-4)

    def full_step():
        full_opt.zero_grad()
        (full(x) ** 2).mean().backward()
        full_opt.step()

    out["full"] = _time(full_step, steps)
    for kind, kw in CONFIGS.items():
        cfg = (peft.LoKrConfig if kind == "lokr" else peft.LoHaConfig)(
            target_modules=[str(2 * i) for i in range(layers)], **kw
        )
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt):
            opt.zero_grad()
            (model(x) ** 2).mean().backward()
            opt.step()

        out[kind] = _time(step, steps)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    shape = f"{args.layers} x Linear({args.dim}, {args.dim}), batch {args.batch}"
    print(
        f"machine: {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, torch threads {torch.get_num_threads()}"
    )
    print(f"model: {shape}; adapters r=8 on every Linear\n")
    j = jax_times(args.dim, args.layers, args.batch, args.steps)
    p = peft_times(args.dim, args.layers, args.batch, args.steps)
    print(f"{'step':<8} {'lycoris_jax ms':>15} {'/frozen':>8} {'PEFT ms':>10} {'/frozen':>8} {'jax/PEFT':>9}")
    for key in ("frozen", "full", "lokr", "loha"):
        print(
            f"{key:<8} {j[key] * 1e3:>15.2f} {j[key] / j['frozen']:>8.2f} {p[key] * 1e3:>10.2f} "
            f"{p[key] / p['frozen']:>8.2f} {j[key] / p[key]:>9.2f}"
        )


if __name__ == "__main__":
    main()
