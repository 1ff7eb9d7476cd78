"""Fine-tune a small Flax NNX model with LoKr and LoHa, then prove PyTorch loads the result.

Trains the adapters under ``nnx.jit`` with ``nnx.Optimizer(..., wrt=LycorisParam)``, saves PEFT
files, loads them with real PEFT (``peft.PeftModel.from_pretrained``) and with ``lycoris_torch``
on a torch model holding the same base weights, and compares outputs.

Run: ``python -m lycoris_jax.demo [--steps N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lycoris_jax as lj

IN, HIDDEN, OUT, CH = 32, 64, 1, 8


class Model(nnx.Module):
    """``conv`` (Conv1d k=3 over a length-8 sequence of 4 channels) -> ``layers.{0,1}`` (Linear) -> ``head``."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(4, CH, (3,), padding=((1, 1),), rngs=rngs)
        self.layers = nnx.List([nnx.Linear(CH * 8, HIDDEN, rngs=rngs), nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)])
        self.head = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (batch, 8, 4) channels-last
        h = jax.nn.gelu(self.conv(x)).reshape(x.shape[0], -1)
        for layer in self.layers:
            h = jnp.tanh(layer(h))
        return self.head(h)[..., 0]


def _task(n: int = 512) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 8, 4)).astype(np.float32)
    y = np.sin(x[:, :, 0].sum(-1)) + 0.5 * x[:, 1, 1] * x[:, 2, 2]
    return x, y.astype(np.float32)


def _torch_mirror(model: Model):
    """A torch model with the same module paths and base weights (NCL layout)."""
    import torch
    from torch import nn

    class TorchModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(4, CH, 3, padding=1)
            self.layers = nn.ModuleList([nn.Linear(CH * 8, HIDDEN), nn.Linear(HIDDEN, HIDDEN)])
            self.head = nn.Linear(HIDDEN, OUT)

        def forward(self, x):  # x: (batch, 4, 8)
            h = nn.functional.gelu(self.conv(x), approximate="tanh")
            h = h.transpose(1, 2).reshape(x.shape[0], -1)  # flatten in the channels-last order JAX uses
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return self.head(h)[..., 0]

    mirror = TorchModel()
    with torch.no_grad():
        for name, module in mirror.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                src = model.conv if name == "conv" else model.head if name == "head" else model.layers[int(name[-1])]
                module.weight.copy_(torch.tensor(np.asarray(lj.functional.to_torch_layout(src.kernel[...]))))
                module.bias.copy_(torch.tensor(np.asarray(src.bias[...])))
    return mirror


def run(kind: str, steps: int, out: str) -> dict[str, float]:
    x, y = _task()
    base = Model(nnx.Rngs(0))
    model = Model(nnx.Rngs(0))
    cfg_cls, tuner_cls = (lj.LoKrConfig, lj.LoKrModel) if kind == "lokr" else (lj.LoHaConfig, lj.LoHaModel)
    cfg = cfg_cls(r=4, alpha=8, target_modules=["conv", "layers.0", "layers.1"], use_effective_conv2d=True)
    tuner = tuner_cls(model, cfg, rngs=nnx.Rngs(params=1, dropout=2))
    optimizer = nnx.Optimizer(tuner, optax.adam(3e-3), wrt=lj.LycorisParam)

    @nnx.jit
    def step(tuner, optimizer, xb, yb):
        def loss_fn(t):
            return ((t(xb) - yb) ** 2).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.LycorisParam))(tuner)
        optimizer.update(tuner, grads)
        return loss

    start = time.perf_counter()
    first = float(step(tuner, optimizer, x, y))
    for _ in range(steps - 1):
        step(tuner, optimizer, x, y)
    seconds = time.perf_counter() - start
    model.eval()
    final = float(nnx.jit(lambda t: ((t(jnp.asarray(x)) - y) ** 2).mean())(tuner))
    tuner.save_pretrained(out)
    ours = np.asarray(tuner(jnp.asarray(x)))

    import torch

    import lycoris_torch as lt

    tx = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    result = {"loss_start": first, "loss_end": final, "seconds": seconds}
    with torch.no_grad():
        theirs = lt.LycorisTuner.from_pretrained(_torch_mirror(base), out).eval()(tx).numpy()
        result["lycoris_torch_max_abs_diff"] = float(np.abs(theirs - ours).max())
        try:
            import peft
        except ImportError:
            result["peft_max_abs_diff"] = float("nan")
        else:
            theirs = peft.PeftModel.from_pretrained(_torch_mirror(base), out).eval()(tx).numpy()
            result["peft_max_abs_diff"] = float(np.abs(theirs - ours).max())
    merged = lj.LycorisTuner.from_pretrained(Model(nnx.Rngs(0)), out).merge_and_unload()
    result["merged_max_abs_diff"] = float(np.abs(np.asarray(merged(jnp.asarray(x))) - ours).max())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None, help="directory for the adapters (default: a temp dir)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="lycoris-demo-")
    ok = True
    for kind in ("lokr", "loha"):
        r = run(kind, args.steps, f"{out}/{kind}")
        print(
            f"{kind}: loss {r['loss_start']:.4f} -> {r['loss_end']:.4f} in {r['seconds']:.1f}s ({args.steps} jitted steps); "
            f"PEFT reload max|diff| {r['peft_max_abs_diff']:.1e}; lycoris_torch {r['lycoris_torch_max_abs_diff']:.1e}; "
            f"merged {r['merged_max_abs_diff']:.1e}; saved to {out}/{kind}"
        )
        ok &= r["loss_end"] < 0.5 * r["loss_start"]
        ok &= max(r["peft_max_abs_diff"], r["lycoris_torch_max_abs_diff"], r["merged_max_abs_diff"]) < 1e-4
    print("demo OK: trained in JAX, PEFT and lycoris_torch load the adapters" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
