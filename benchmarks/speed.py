"""Speed of adapter training against the frozen base, full fine-tuning and PEFT (issue "Speed").

Every figure is a ratio of steps measured side by side in one run: the variants are timed in
round-robin rounds and each keeps its median, so a busy machine slows all of them alike.

    python benchmarks/speed.py b1 b2 b3 b4 b5      # all of it (CPU: ~10 minutes)
    python benchmarks/speed.py b1 --rounds 5       # one part

- B1: train step on a Llama-shaped model (d=512, 4 layers, seq 128, batch 4, r=8 on q/k/v/o/gate/
  up/down) / the frozen-base step (gradients to the embeddings only) and / the full fine-tune step
  (Adam on every weight): NNX (its own Llama) and Linen (transformers' FlaxLlama), LoKr and LoHa,
  on the default path and on PEFT's.
- B2: the same step, lycoris_jax (Linen FlaxLlama) / PEFT on transformers' torch Llama (same
  config, weights and threads), and lycoris_torch / PEFT.
- B3: peak memory of those steps: the compiled JAX step's temp bytes (``memory_analysis``), and
  torch's peak RSS growth in a fresh process per step.
- B4: one 4096x4096 LoKr Linear, train step (forward + factor gradients) at 1..4096 tokens:
  factored vs materialised (``"merged"``) vs PEFT's arithmetic; the crossover.
- B5: ``merge_and_unload`` of a 1B-parameter-shaped Llama (bf16) built abstractly and filled with
  zeros: seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lycoris_jax as lj
from lycoris_jax import linen

D, LAYERS, FF, HEADS, VOCAB, SEQ, BATCH, R = 512, 4, 1376, 8, 1024, 128, 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = (64, 96, 64, 16)  # D, FF, VOCAB, SEQ of ``--small``
if os.environ.get("LYCORIS_SPEED_SMALL"):
    D, FF, VOCAB, SEQ = SMALL
METHODS = {"lokr": (lj.LoKrConfig, lj.LoKrModel), "loha": (lj.LoHaConfig, lj.LoHaModel)}


# ---------------------------------------------------------------- timing
def round_robin(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn over ``rounds`` rounds (2 warm-ups)."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |")
    sys.stdout.flush()


# ---------------------------------------------------------------- an NNX Llama
class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = lin(D, D), lin(D, D), lin(D, D), lin(D, D)
        self.gate_proj, self.up_proj, self.down_proj = lin(D, FF), lin(D, FF), lin(FF, D)
        self.input_norm, self.post_norm = nnx.RMSNorm(D, rngs=rngs), nnx.RMSNorm(D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        h = self.input_norm(x)
        q, k, v = (p(h).reshape(b, t, HEADS, D // HEADS) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = x + self.o_proj(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, D))
        h = self.post_norm(x)
        return x + self.down_proj(nnx.silu(self.gate_proj(h)) * self.up_proj(h))


class NnxLlama(nnx.Module):
    def __init__(self, seed: int = 0) -> None:
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(LAYERS)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def xent(logits: jax.Array, ids: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _ids() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB)


def functional_step(model: nnx.Module, wrt: Any, loss_fn: Callable[[nnx.Module], jax.Array]) -> Callable[[], Any]:
    """One Adam step on the ``wrt`` variables of ``model``, as ``jax.jit`` of ``nnx.split`` state (the
    other variables are constants of the step; ``nnx.jit``'s per-call graph walk is left out)."""
    graphdef, params, rest = nnx.split(model, wrt, ...)
    tx = optax.adam(1e-4)

    @jax.jit
    def step(params: Any, opt_state: Any, rest: Any) -> Any:
        value, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    box = [params, tx.init(params)]

    def run() -> None:
        box[0], box[1], value = step(box[0], box[1], rest)
        jax.block_until_ready(value)

    return run


def nnx_steps(paths: tuple[str, ...]) -> dict[str, Callable[[], Any]]:
    """``{name: run one step}`` for the NNX Llama: frozen (embeddings only), full, and each method on
    each forward path."""
    ids = _ids()
    loss = lambda m: xent(m(ids), ids)  # noqa: E731
    out = {
        "frozen": functional_step(NnxLlama(), nnx.PathContains("embed"), loss),
        "full": functional_step(NnxLlama(), nnx.Param, loss),
    }
    for method, (config_cls, tuner_cls) in METHODS.items():
        for path in paths:
            tuner = tuner_cls(NnxLlama(), config_cls(r=R, alpha=R, target_modules=TARGETS), forward_path=path)
            tuner.train()
            out[f"{method} {path}"] = functional_step(tuner, lj.LycorisParam, loss)
    return out


# ---------------------------------------------------------------- transformers Llama (Linen / torch)
def _hf_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=SEQ,
    )


def _torch_state() -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return {k: v.clone() for k, v in LlamaForCausalLM(_hf_config()).state_dict().items()}


def linen_steps(paths: tuple[str, ...]) -> dict[str, Callable[[], Any]]:
    from transformers import FlaxLlamaForCausalLM
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    flax_model = FlaxLlamaForCausalLM(_hf_config(), seed=0, _do_init=True)
    params = jax.tree.map(jnp.asarray, convert_pytorch_state_dict_to_flax(_torch_state(), flax_model))
    module = flax_model.module
    ids = _ids()
    mask, positions = jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(SEQ), ids.shape)

    def logits(apply_vars: dict, m: Any = module) -> jax.Array:
        return m.apply(apply_vars, ids, mask, positions).logits

    out: dict[str, Callable[[], Any]] = {}

    @jax.jit
    def frozen(params: Any) -> Any:
        emb = params["model"]["embed_tokens"]["embedding"]

        def loss(emb: jax.Array) -> jax.Array:
            p = {**params, "model": {**params["model"], "embed_tokens": {"embedding": emb}}}
            return xent(logits({"params": p}), ids)

        return jax.grad(loss)(emb)

    out["frozen"] = lambda: jax.block_until_ready(frozen(params))
    tx = optax.adam(1e-4)

    @jax.jit
    def full(params: Any, state: Any) -> Any:
        loss, grads = jax.value_and_grad(lambda p: xent(logits({"params": p}), ids))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    full_state = [params, tx.init(params)]

    def run_full() -> None:
        full_state[0], full_state[1], loss = full(*full_state)
        jax.block_until_ready(loss)

    out["full"] = run_full
    for method, (config_cls, _) in METHODS.items():
        for path in paths:
            adapted, lycoris = linen.adapt(
                module,
                params,
                config_cls(r=R, alpha=R, target_modules=TARGETS),
                key=jax.random.key(0),
                forward_path=path,
                deterministic=False,
            )

            @jax.jit
            def step(lyc: Any, state: Any, params: Any, adapted: Any = adapted) -> Any:
                def loss(lyc: Any) -> jax.Array:
                    out = adapted.apply(
                        {"params": params, "lycoris": lyc}, ids, mask, positions, rngs={"dropout": jax.random.key(2)}
                    )
                    return xent(out.logits, ids)

                value, grads = jax.value_and_grad(loss)(lyc)
                updates, state = tx.update(grads, state, lyc)
                return optax.apply_updates(lyc, updates), state, value

            box = [lycoris, tx.init(lycoris)]

            def run(box: list = box, step: Any = step) -> None:  # the frozen weights are an argument, as above
                box[0], box[1], loss = step(*box, params)
                jax.block_until_ready(loss)

            out[f"{method} {path}"] = run
    return out


def torch_llama(nnx_model: NnxLlama) -> Any:
    """The torch twin of :class:`NnxLlama` (same architecture and weights; module names as PEFT targets)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class TBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = lin(D, D), lin(D, D), lin(D, D), lin(D, D)
            self.gate_proj, self.up_proj, self.down_proj = lin(D, FF), lin(D, FF), lin(FF, D)
            self.input_norm, self.post_norm = nn.RMSNorm(D, eps=1e-6), nn.RMSNorm(D, eps=1e-6)

        def forward(self, x: Any) -> Any:
            b, t, _ = x.shape
            h = self.input_norm(x)
            q, k, v = (
                p(h).view(b, t, HEADS, D // HEADS).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
            )
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
            x = x + self.o_proj(a)
            h = self.post_norm(x)
            return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    class TLlama(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, D)
            self.layers = nn.ModuleList([TBlock() for _ in range(LAYERS)])
            self.norm = nn.RMSNorm(D, eps=1e-6)
            self.lm_head = nn.Linear(D, VOCAB, bias=False)

        def forward(self, ids: Any) -> Any:
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.norm(x))

    model = TLlama()
    state = {}
    for path, value in nnx.to_flat_state(nnx.state(nnx_model, nnx.Param)):
        key = ".".join(str(p) for p in path)
        array = torch.from_numpy(np.array(value.get_value(), np.float32))
        if key.endswith(".kernel"):
            state[key[: -len("kernel")] + "weight"] = array.T.contiguous()
        elif key.endswith(".scale"):
            state[key[: -len("scale")] + "weight"] = array
        else:  # embed.embedding
            state[key[: -len("embedding")] + "weight"] = array
    model.load_state_dict(state)
    return model


def torch_steps(which: tuple[str, ...] = ("frozen", "full", "peft", "lycoris_torch")) -> dict[str, Callable[[], Any]]:
    """``{name: run one step}`` on the torch twin of the NNX Llama (GPU when torch sees one)."""
    import peft
    import torch

    import lycoris_torch as lt

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = NnxLlama()
    ids = torch.from_numpy(np.asarray(_ids()).astype(np.int64)).to(device)

    def model() -> Any:
        return torch_llama(reference).to(device).train()

    def loss(m: Any) -> Any:
        logits = m(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    out: dict[str, Callable[[], Any]] = {}
    if "frozen" in which:
        frozen = model().requires_grad_(False)
        frozen.embed.weight.requires_grad_(True)

        def frozen_step() -> None:
            frozen.zero_grad()
            loss(frozen).backward()
            sync()

        out["frozen"] = frozen_step
    if "full" in which:
        full = model()
        full_opt = torch.optim.Adam(full.parameters(), lr=1e-4)

        def full_step() -> None:
            full_opt.zero_grad()
            loss(full).backward()
            full_opt.step()
            sync()

        out["full"] = full_step
    for method in METHODS:
        for kind in [k for k in ("peft", "lycoris_torch") if k in which]:
            if kind == "peft":
                cfg = (peft.LoKrConfig if method == "lokr" else peft.LoHaConfig)(r=R, alpha=R, target_modules=TARGETS)
                m = peft.get_peft_model(model(), cfg)
            else:
                cfg = (lt.LoKrConfig if method == "lokr" else lt.LoHaConfig)(r=R, alpha=R, target_modules=TARGETS)
                m = (lt.LoKrModel if method == "lokr" else lt.LoHaModel)(model(), cfg)
            m.train()
            opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4)

            def step(m: Any = m, opt: Any = opt) -> None:
                opt.zero_grad()
                loss(m).backward()
                opt.step()
                sync()

            out[f"{method} {kind}"] = step
    return out


# ---------------------------------------------------------------- the parts
def b1(rounds: int) -> dict[str, float]:
    results = {}
    fronts = [("NNX", nnx_steps)]
    try:
        import transformers

        if hasattr(transformers, "FlaxLlamaForCausalLM"):
            fronts.append(("Linen", linen_steps))
        else:
            print(f"\n(transformers {transformers.__version__} has no Flax Llama: Linen rows skipped)")
    except ImportError:
        print("\n(transformers missing: Linen rows skipped)")
    for front, build in fronts:
        fns = build(("auto", "peft"))
        t = round_robin(fns, rounds)
        rows = [[k, t[k] * 1e3, t[k] / t["frozen"], t[k] / t["full"]] for k in fns]
        table(
            f"B1 {front}: train step, Llama d={D} x{LAYERS}, seq {SEQ}, batch {BATCH}, r={R}",
            ["step", "ms", "/ frozen", "/ full"],
            rows,
        )
        results.update({f"{front} {k}": v for k, v in t.items()})
    return results


def b2(rounds: int) -> None:
    import torch

    jt = round_robin({k: v for k, v in nnx_steps(("auto",)).items() if k != "full"}, rounds)
    tt = round_robin(torch_steps(("frozen", "peft", "lycoris_torch")), rounds)
    rows = [["frozen", jt["frozen"] * 1e3, tt["frozen"] * 1e3, "", jt["frozen"] / tt["frozen"], ""]]
    for method in METHODS:
        j, p, o = jt[f"{method} auto"], tt[f"{method} peft"], tt[f"{method} lycoris_torch"]
        rows.append([method, j * 1e3, p * 1e3, o * 1e3, j / p, o / p])
    table(
        f"B2: step vs PEFT on the torch twin (torch threads {torch.get_num_threads()}); default paths",
        ["step", "lycoris_jax ms", "PEFT ms", "lycoris_torch ms", "lycoris_jax / PEFT", "lycoris_torch / PEFT"],
        rows,
    )


class PeakRSS:
    """``with PeakRSS() as rss: ...``: ``rss.growth_mib`` is the peak resident set size reached inside
    the block (sampled every millisecond) above the size on entry."""

    @staticmethod
    def _mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> PeakRSS:
        import threading

        self.base = self.peak = self._mib()
        self._running = True

        def sample() -> None:
            while self._running:
                self.peak = max(self.peak, self._mib())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, self._mib())
        self.growth_mib = self.peak - self.base


def _torch_rss_child(kind: str) -> None:
    import torch

    steps = torch_steps((kind,) if kind in ("frozen", "full") else (kind.split()[1],))  # builds the models
    fn = steps[kind]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        fn()
        growth = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with PeakRSS() as rss:  # grads and optimizer state count as the step's
            for _ in range(3):
                fn()
        growth = rss.growth_mib
    print(json.dumps({"kind": kind, "peak_growth_mib": growth}))


def b3() -> None:
    """JAX: the compiled gradient step's temporaries plus what training keeps for the trained
    variables (their gradients and Adam's two moments: 3x their bytes)."""
    ids = _ids()
    rows = []
    loss = lambda m: xent(m(ids), ids)  # noqa: E731

    def step_mib(model: nnx.Module, wrt: Any) -> float:
        graphdef, params, rest = nnx.split(model, wrt, ...)
        grad = jax.jit(lambda p, r: jax.grad(lambda p: loss(nnx.merge(graphdef, p, r)))(p))
        memory = grad.lower(params, rest).compile().memory_analysis()
        trained = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        return (memory.temp_size_in_bytes + 3 * trained) / 2**20

    jax_mib = {"frozen": step_mib(NnxLlama(), nnx.PathContains("embed")), "full": step_mib(NnxLlama(), nnx.Param)}
    for method, (config_cls, tuner_cls) in METHODS.items():
        for path in ("auto", "peft"):
            tuner = tuner_cls(NnxLlama(), config_cls(r=R, alpha=R, target_modules=TARGETS), forward_path=path)
            tuner.train()
            jax_mib[f"{method} {path}"] = step_mib(tuner, lj.LycorisParam)
    torch_mib = {}
    for kind in ("frozen", "full", "lokr peft", "loha peft", "lokr lycoris_torch", "loha lycoris_torch"):
        proc = subprocess.run(
            [sys.executable, __file__, "_rss", kind], capture_output=True, text=True, check=True, env=os.environ
        )
        torch_mib[kind] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_growth_mib"]
    for key, value in jax_mib.items():
        rows.append(["NNX " + key, value, value / jax_mib["full"]])
    for key, value in torch_mib.items():
        rows.append(["torch " + key, value, value / torch_mib["full"]])
    table(
        "B3: step memory, MiB (JAX: the compiled gradient step's temporaries + 3x the trained bytes for "
        "gradients and Adam; torch: peak RSS growth over three optimizer steps, from before the first)",
        ["step", "MiB", "/ full"],
        rows,
    )


def b4(rounds: int, dim: int = 4096, tokens: tuple[int, ...] = (1, 16, 128, 1024, 4096)) -> None:
    layer = nnx.Linear(dim, dim, use_bias=False, rngs=nnx.Rngs(0))
    rows = []
    tuners = {}
    for path in ("factored", "merged", "peft"):
        tuners[path] = lj.LoKrModel(
            nnx.Sequential(nnx.clone(layer)),
            lj.LoKrConfig(r=R, alpha=R, target_modules=["layers.0"]),
            forward_path=path,
        )
        tuners[path].train()
    kernel = layer.kernel[...]
    frozen = jax.jit(jax.grad(lambda x, k: ((x @ k) ** 2).mean()))
    for n in tokens:
        x = jax.random.normal(jax.random.key(0), (n, dim))
        loss = lambda t, x=x: (t(x) ** 2).mean()  # noqa: E731
        fns = {path: functional_step(tuner, lj.LycorisParam, loss) for path, tuner in tuners.items()}
        fns["frozen"] = lambda x=x: jax.block_until_ready(frozen(x, kernel))
        for path in ("factored", "merged"):  # inference: the forward alone, eval mode
            graphdef, state = nnx.split(tuners[path])
            forward = jax.jit(lambda s, x, graphdef=graphdef: nnx.merge(graphdef, s)(x))
            fns[f"{path} fwd"] = lambda forward=forward, state=state, x=x: jax.block_until_ready(forward(state, x))
        t = round_robin(fns, rounds)
        rows.append(
            [
                n,
                *(t[k] * 1e3 for k in ("frozen", "factored", "merged", "peft")),
                t["factored"] / t["merged"],
                *(t[k] * 1e3 for k in ("factored fwd", "merged fwd")),
                t["factored fwd"] / t["merged fwd"],
            ]
        )
    table(
        f"B4: LoKr {dim}x{dim}, r={R}: train step (forward + factor gradients; frozen: forward + dx of the layer) "
        "and eval forward",
        [
            "tokens",
            "frozen ms",
            "factored ms",
            "merged ms",
            "peft ms",
            "factored / merged",
            "factored fwd ms",
            "merged fwd ms",
            "fwd factored / merged",
        ],
        rows,
    )


def b5(child_method: str = "") -> None:
    d, ff, layers, vocab = 2048, 5632, 22, 32000  # TinyLlama-1.1B's shape

    class Big(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            lin = lambda i, o: nnx.Linear(i, o, use_bias=False, param_dtype=jnp.bfloat16, rngs=rngs)  # noqa: E731
            self.embed = nnx.Embed(vocab, d, param_dtype=jnp.bfloat16, rngs=rngs)
            self.layers = nnx.List(
                [
                    nnx.Dict(
                        q_proj=lin(d, d),
                        k_proj=lin(d, d // 8),
                        v_proj=lin(d, d // 8),
                        o_proj=lin(d, d),
                        gate_proj=lin(d, ff),
                        up_proj=lin(d, ff),
                        down_proj=lin(ff, d),
                    )
                    for _ in range(layers)
                ]
            )
            self.lm_head = lin(d, vocab)

    def child(method: str) -> None:
        config_cls, tuner_cls = METHODS[method]
        abstract = nnx.eval_shape(lambda: Big(nnx.Rngs(0)))  # no initialiser runs
        graphdef, state = nnx.split(abstract)
        model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
        params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        start = time.perf_counter()
        tuner = tuner_cls(model, config_cls(r=R, alpha=R, target_modules=TARGETS, init_weights=False))
        attach = time.perf_counter() - start
        with PeakRSS() as rss:
            start = time.perf_counter()
            merged = tuner.merge_and_unload()
            jax.block_until_ready(nnx.state(merged))
            seconds = time.perf_counter() - start
        print(json.dumps([method, f"{params / 1e9:.2f} B", attach, seconds, rss.growth_mib]))

    if child_method:
        return child(child_method)
    rows = []
    for method in METHODS:
        proc = subprocess.run(
            [sys.executable, __file__, "_b5", method], capture_output=True, text=True, check=True, env=os.environ
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    table(
        "B5: merge_and_unload, 1.1B-parameter Llama shape (bf16, 22 layers, d=2048), eager, CPU, a process each",
        ["method", "parameters", "attach s", "merge_and_unload s", "peak RSS growth MiB"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["b1", "b2", "b3", "b4", "b5"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 16, 128, 1024, 4096])
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke test of the script")
    args = parser.parse_args(argv)
    if args.small:
        global D, FF, VOCAB, SEQ
        D, FF, VOCAB, SEQ = SMALL
        os.environ["LYCORIS_SPEED_SMALL"] = "1"  # for the B3 child processes
    if args.parts[:1] == ["_rss"]:
        return _torch_rss_child(" ".join(args.parts[1:]))
    if args.parts[:1] == ["_b5"]:
        return b5(args.parts[1])
    import torch

    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    for part in args.parts:
        if part == "b4":
            b4(args.rounds, tokens=tuple(args.tokens))
        elif part in ("b3", "b5"):
            globals()[part]()
        else:
            globals()[part](args.rounds)


if __name__ == "__main__":
    main()
