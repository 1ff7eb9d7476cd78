"""``lycoris-jax finetune``: train a LoKr or LoHa adapter on your checkpoint and your text.

``--model DIR`` is a local transformers causal-LM checkpoint: ``config.json``, weights
(``flax_model.msgpack``, or torch's ``model.safetensors``, converted) and tokenizer files
(``tokenizer.json``...). Nothing is downloaded. ``--data FILE`` is plain text (``.txt``) or JSON
lines with a ``"text"`` field (``.jsonl``), tokenized with the model's tokenizer (documents joined
by its end-of-sequence token) and packed into rows of ``--seq`` tokens; the last ``--eval-fraction``
of the rows is held out for an eval loss at every save.

Training is data-parallel over every device (the base weights sharded over them instead where
they would not fit one), jitted, with Adam on the adapter's factors. On several hosts (a TPU pod
slice) the same command runs on each, with ``--distributed`` (JAX finds the hosts) or
``--coordinator/--num-processes/--process-id``: one program over every host's devices, each host
placing its own part of each batch; process 0 prints and writes the final files. Every ``--save-every``
steps, and on Ctrl-C, ``OUT/checkpoints`` gets a resumable checkpoint (orbax: factors, optimizer
state, step, losses; the data order is a function of the step), and ``--resume`` continues to the
losses an uninterrupted run gives. At the end ``OUT`` holds ``adapter/`` (PEFT's files),
``adapter.safetensors`` (a LyCORIS/kohya file), ``loss.png`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Data", "add_arguments", "check_arguments", "load_data", "main", "run"]

WEIGHTS = ("flax_model.msgpack", "flax_model.msgpack.index.json", "model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
#: what a checkpoint must agree on with the command that resumes it
RESUME_KEYS = ("method", "rank", "alpha", "targets", "lr", "batch", "seq", "eval_fraction", "seed", "data_sha256")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a local transformers causal-LM checkpoint directory")
    parser.add_argument("--data", required=True, help='a .txt file, or .jsonl with a "text" field per line')
    parser.add_argument("--method", choices=["lokr", "loha"], default="lokr", help="adapter type (default: lokr)")
    parser.add_argument("--rank", type=int, default=8, help="r (default: 8)")
    parser.add_argument("--alpha", type=float, default=None, help="alpha (default: the rank, a scale of 1)")
    parser.add_argument(
        "--targets",
        default="all-linear",
        help="all-linear (default), or module names, comma-separated (PEFT's matching)",
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step, a multiple of the devices (default: 8)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row (default: 256)")
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="rows held out (default: 0.05)")
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default: 100)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    parser.add_argument("--out", default="finetune_output", help="output directory (default: finetune_output)")
    parser.add_argument("--seed", type=int, default=0, help="adapter initialisation and data order (default: 0)")
    hosts = parser.add_argument_group(
        "several hosts (a TPU pod slice: the same command on every host, each with its own devices)"
    )
    hosts.add_argument(
        "--distributed",
        action="store_true",
        help="join the other hosts' processes as JAX finds them (a Cloud TPU VM slice, SLURM, Open MPI, Kubernetes)",
    )
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="or name them: process 0's address and a free port")
    hosts.add_argument("--num-processes", type=int, metavar="N", help="with --coordinator: how many processes")
    hosts.add_argument("--process-id", type=int, metavar="I", help="with --coordinator: this one's, 0 to N-1")


# ---------------------------------------------------------------- checking the input
def check_arguments(args: argparse.Namespace) -> dict:
    """Refuse unusable input with one line (``ValueError``) before anything heavy is imported;
    returns the model's ``config.json``."""
    for flag, value in (("--steps", args.steps), ("--rank", args.rank), ("--batch", args.batch),
                        ("--save-every", args.save_every), ("--seq", args.seq)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag}: expected a positive integer, got {value}")
    if args.seq < 2:
        raise ValueError(f"--seq: a row needs at least 2 tokens (an input and its next token), got {args.seq}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr: expected a positive finite learning rate, got {args.lr}")
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha > 0):
        raise ValueError(f"--alpha: expected a positive finite number, got {args.alpha}")
    if not 0 <= args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction: expected a fraction in [0, 1), got {args.eval_fraction}")
    if args.seed < 0:
        raise ValueError(f"--seed: expected a non-negative integer, got {args.seed}")
    _check_hosts(args)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r}: exists and is not a directory")
    checkpoints = os.path.join(args.out, "checkpoints")
    if args.resume and not os.path.isdir(checkpoints):
        raise ValueError(f"--resume: no checkpoint in {checkpoints!r} (run without --resume first)")
    if not args.resume and os.path.isdir(checkpoints) and os.listdir(checkpoints):
        raise ValueError(
            f"--out {args.out!r}: holds checkpoints of an earlier run; pass --resume to continue it, or another --out"
        )
    config = _check_model(args.model)
    limit = next(
        (
            config[k]
            for k in ("max_position_embeddings", "n_positions", "max_seq_len")
            if isinstance(config.get(k), int)
        ),
        None,
    )
    if limit is not None and args.seq > limit:
        raise ValueError(f"--seq {args.seq}: longer than the model's {limit} positions (config.json)")
    _check_data(args.data)
    return config


def _check_hosts(args: argparse.Namespace) -> None:
    named = {"--coordinator": args.coordinator, "--num-processes": args.num_processes, "--process-id": args.process_id}
    given = [k for k, v in named.items() if v is not None]
    if args.distributed and given:
        raise ValueError(f"--distributed finds the processes itself: drop {', '.join(given)}")
    if given and len(given) < 3:
        missing = [k for k in named if k not in given]
        raise ValueError(f"{', '.join(given)}: give --coordinator, --num-processes and --process-id together "
                         f"(missing {', '.join(missing)})")  # fmt: skip
    if not given:
        return
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {args.coordinator!r}: expected HOST:PORT, such as 10.0.0.2:8476")
    if args.num_processes < 1:
        raise ValueError(f"--num-processes: expected a positive integer, got {args.num_processes}")
    if not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id {args.process_id}: expected 0 to {args.num_processes - 1} (--num-processes)")


def _join_hosts(args: argparse.Namespace) -> None:
    """Join the run's other processes (``jax.distributed``), before JAX touches a device. On CPU the
    collectives between processes go through gloo."""
    import jax

    if not (args.distributed or (args.num_processes or 1) > 1):
        return
    if args.distributed:
        try:
            jax.distributed.initialize()
        except ValueError as err:  # no cluster JAX knows around this process
            raise ValueError(
                f"--distributed: JAX found no cluster to join here ({err}); it reads a Cloud TPU VM's metadata, "
                "SLURM, Open MPI or Kubernetes; elsewhere name the processes with --coordinator, --num-processes "
                "and --process-id"
            ) from None
    else:
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # before the CPU backend exists


def _check_model(path: str) -> dict:
    """``config.json`` of a causal LM with a Flax class, safetensors or Flax weights, tokenizer files."""
    from lycoris_cli import read_model_config

    config = read_model_config(path, "a transformers checkpoint directory")
    from transformers.models.auto.modeling_flax_auto import FLAX_MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as FLAX

    if config.get("model_type") not in FLAX:
        raise ValueError(
            f"--model {path!r}: model_type {config.get('model_type')!r} has no Flax causal-LM class in transformers "
            f"(these do: {', '.join(sorted(FLAX))})"
        )
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHTS):
        pickled = [
            f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json") if os.path.exists(os.path.join(path, f))
        ]
        why = f" ({pickled[0]} is a pickle: never loaded; save the model with safetensors)" if pickled else ""
        raise ValueError(f"--model {path!r}: no weights: expected {' or '.join(WEIGHTS[::2])}{why}")
    if not any(os.path.isfile(os.path.join(path, t)) for t in TOKENIZER_FILES):
        raise ValueError(
            f"--model {path!r}: no tokenizer files (expected tokenizer.json or another of {TOKENIZER_FILES})"
        )
    return config


def _check_data(path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"--data {path!r}: no such file")
    if not path.endswith((".txt", ".jsonl")):
        raise ValueError(f"--data {path!r}: expected a .txt or a .jsonl file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"--data {path!r}: the file is empty")


# ---------------------------------------------------------------- data
@dataclass
class Data:
    """Packed token rows ``(rows, seq)``: ``train`` and the held-out ``eval``; ``sha256`` of the file."""

    train: np.ndarray
    eval: np.ndarray
    tokens: int
    sha256: str

    def batch(self, step: int, size: int, seed: int) -> np.ndarray:
        """The rows of ``step``: consecutive in a permutation of the training rows drawn per epoch from
        ``seed`` (a function of the step alone: what makes ``--resume`` exact)."""
        n, rows = len(self.train), []
        for i in range(step * size, (step + 1) * size):
            epoch, j = divmod(i, n)
            rows.append(np.random.default_rng([seed, epoch]).permutation(n)[j])
        return self.train[rows]


def _documents(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".txt"):
            return [fh.read()]
        documents = []
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"--data {path}:{number}: not JSON: {err}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'--data {path}:{number}: expected an object with a string "text" field')
            documents.append(record["text"])
        return documents


def load_data(path: str, tokenizer: Any, seq: int, eval_fraction: float) -> Data:
    """Tokenize ``path`` (documents joined by the end-of-sequence token), pack it into rows of ``seq``
    tokens (the remainder dropped) and hold out the last ``eval_fraction`` of the rows (at least one
    when the fraction is positive)."""
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    documents = [d for d in _documents(path) if d.strip()]
    if not documents:
        raise ValueError(f"--data {path!r}: no text")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for document in documents:
        ids += list(tokenizer(document, add_special_tokens=False)["input_ids"]) + eos
    rows = len(ids) // seq
    held = math.ceil(rows * eval_fraction) if eval_fraction > 0 else 0
    if rows - held < 1:
        raise ValueError(
            f"--data {path!r}: {len(ids)} tokens make {rows} row(s) of --seq {seq}; need {held + 1} "
            f"({held} held out for eval); use more text or a shorter --seq"
        )
    packed = np.asarray(ids[: rows * seq], np.int32).reshape(rows, seq)
    return Data(packed[: rows - held], packed[rows - held :], len(ids), digest)


# ---------------------------------------------------------------- the run
def _config(args: argparse.Namespace, data: Data) -> dict:
    targets = (
        args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t.strip()]
    )
    return dict(
        method=args.method,
        rank=args.rank,
        alpha=float(args.alpha if args.alpha is not None else args.rank),
        targets=targets,
        lr=args.lr,
        batch=args.batch,
        seq=args.seq,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        data_sha256=data.sha256,
    )


def _load_model(path: str, seq: int) -> tuple[Any, Any, Any]:
    """``(flax model, params, tokenizer)`` from the local directory (never the network)."""
    from transformers import AutoConfig, AutoTokenizer, FlaxAutoModelForCausalLM

    from lycoris_cli.demo import cap_positions

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "max_position_embeddings") and config.model_type in ("llama", "gemma", "mistral"):
        cap_positions(config, seq)  # their Flax classes build a positions² mask at init
    has_flax = any(os.path.isfile(os.path.join(path, w)) for w in WEIGHTS[:2])
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers' own errors, whatever they are
        raise ValueError(f"--model {path!r}: cannot load its tokenizer: {type(err).__name__}: {err}") from None
    model = FlaxAutoModelForCausalLM.from_pretrained(path, config=config, from_pt=not has_flax, local_files_only=True)
    return model, model.params, tokenizer


def _placement(params: Any, mesh: Any) -> Any:
    """Replicated where the base weights fit one device (under half its memory); otherwise each
    weight split over the devices on its first divisible axis (FSDP)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    stats = jax.local_devices()[0].memory_stats() or {}
    n = mesh.size
    if not stats.get("bytes_limit") or size < stats["bytes_limit"] / 2 or n == 1:
        return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), params)

    def split(x: Any) -> Any:
        axis = next((i for i, d in enumerate(x.shape) if d % n == 0), None)
        spec = [None] * x.ndim
        if axis is not None:
            spec[axis] = "data"
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(split, params)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    import jax
    import jax.numpy as jnp
    import optax
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from tqdm.auto import tqdm

    import lycoris_jax as lj
    from lycoris_jax import pytree

    start = time.perf_counter()
    _join_hosts(args)
    devices, processes = jax.devices(), jax.process_count()
    if args.batch % len(devices):
        where = f" of {processes} processes" if processes > 1 else ""
        raise ValueError(f"--batch {args.batch}: not a multiple of the {len(devices)} devices{where}")
    first = jax.process_index() == 0  # the one process that prints and writes the final files
    say = print if first else lambda *_, **__: None
    model, params, tokenizer = _load_model(args.model, args.seq)
    data = load_data(args.data, tokenizer, args.seq, args.eval_fraction)
    run_config = _config(args, data)
    config_cls = lj.LoKrConfig if args.method == "lokr" else lj.LoHaConfig
    config = config_cls(r=args.rank, alpha=run_config["alpha"], target_modules=run_config["targets"])
    try:
        adapter = pytree.init(params, config, key=jax.random.key(args.seed))
    except TypeError as err:  # a targeted layer no front end adapts (GPT-2's Conv1D): unusable input
        raise ValueError(f"--model {args.model!r}: {err}") from None
    if not adapter.factors:
        raise ValueError(f"--targets {args.targets!r}: selects no module of {type(model).__name__}")

    mesh = Mesh(np.asarray(devices), ("data",))
    replicated, rows = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    params = _put(params, _placement(params, mesh))
    adapter = _put(adapter, replicated)
    tx = optax.adam(args.lr)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(adapter)

    def row_losses(a: Any, batch: jax.Array) -> jax.Array:
        logits = model(batch, params=pytree.merge(params, a)).logits[:, :-1].astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(axis=1)

    @jax.jit
    def train_step(a: Any, state: Any, batch: jax.Array) -> tuple[Any, Any, jax.Array]:
        value, grads = jax.value_and_grad(lambda a: row_losses(a, batch).mean())(a)
        updates, state = tx.update(grads, state, a)
        return optax.apply_updates(a, updates), state, value

    eval_rows = jax.jit(row_losses, out_shardings=replicated)  # every process reads every row's loss

    def eval_loss(a: Any) -> float | None:
        if not len(data.eval):
            return None
        pad = -len(data.eval) % args.batch
        padded = np.concatenate([data.eval, data.eval[:1].repeat(pad, 0)])
        losses = [eval_rows(a, _put(padded[i : i + args.batch], rows)) for i in range(0, len(padded), args.batch)]
        return float(np.concatenate([np.asarray(x) for x in losses])[: len(data.eval)].mean())

    os.makedirs(args.out, exist_ok=True)
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(args.out, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False),
    )
    step, losses, evals = 0, [], []
    if args.resume:
        latest = manager.latest_step()
        if latest is None:
            raise ValueError(f"--resume: no complete checkpoint in {os.path.join(args.out, 'checkpoints')!r}")
        meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        changed = [k for k in RESUME_KEYS if meta["config"].get(k) != run_config[k]]
        if changed:
            k = changed[0]
            raise ValueError(
                f"--resume: the checkpoint at step {latest} was made with {k}={meta['config'].get(k)!r}, "
                f"this command has {run_config[k]!r}"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"adapter": adapter, "opt_state": opt_state})
        state = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        adapter, opt_state = state["adapter"], state["opt_state"]
        step, losses, evals = meta["step"], meta["losses"], meta["evals"]
        say(f"resumed from step {step} ({os.path.join(args.out, 'checkpoints', str(latest))})")

    def save() -> None:
        evals.append([step, eval_loss(adapter)])
        meta = dict(step=step, losses=losses[:step], evals=evals, config=run_config)
        state = {"adapter": adapter, "opt_state": opt_state}
        manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )
        manager.wait_until_finished()

    n_factors = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(adapter))
    n_base = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    say(
        f"{args.method} r={args.rank} alpha={run_config['alpha']:g} on {len(adapter.factors)} modules of "
        f"{type(model).__name__}: {n_factors:,} trainable parameters ({100 * n_factors / n_base:.3g}% of {n_base:,}); "
        f"{len(data.train)} training rows and {len(data.eval)} held out, of {args.seq} tokens "
        f"({data.tokens:,} tokens); {len(devices)} device(s)" + (f" in {processes} processes" if processes > 1 else "")
    )
    # Ctrl-C stops after the step under way (a second one at once), then saves: never a half-updated state.
    # Several processes stop together: each step they agree whether any was interrupted.
    stop: list[int] = []

    def stopping() -> bool:
        if processes == 1:
            return bool(stop)
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(len(stop)))))

    def interrupt(signum: int, frame: Any) -> None:
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    previous = signal.signal(signal.SIGINT, interrupt)
    bar = tqdm(
        total=args.steps, initial=step, desc=f"finetune {args.method}", unit="step", file=sys.stderr, disable=not first
    )
    try:
        while step < args.steps and not (stopped := stopping()):
            tick = time.perf_counter()
            batch = _put(data.batch(step, args.batch, args.seed), rows)
            adapter, opt_state, value = train_step(adapter, opt_state, batch)
            losses.append(float(value))
            step += 1
            bar.update(1)
            bar.set_postfix(
                loss=f"{losses[-1]:.3f}", tok_s=f"{args.batch * args.seq / (time.perf_counter() - tick):,.0f}"
            )
            if step % args.save_every == 0 or step == args.steps:
                save()
        bar.close()
        if step < args.steps and stopped:
            say(f"interrupted: saving step {step}", file=sys.stderr)
            if manager.latest_step() != step:
                save()
            say(f"saved; continue with the same command and --resume (out: {args.out})", file=sys.stderr)
            return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        manager.close()

    adapter_dir = os.path.join(args.out, "adapter")
    if not first:  # process 0 writes the files; the others wait for it, then end
        _written()
        return 0
    pytree.save_pretrained(adapter, adapter_dir)
    pytree.save_lycoris(adapter, os.path.join(args.out, "adapter.safetensors"))
    final_eval = evals[-1][1] if evals else None
    window = max(1, min(10, len(losses) // 4))
    summary = dict(
        model=os.path.abspath(args.model),
        data=os.path.abspath(args.data),
        trainable_parameters=n_factors,
        steps=step,
        tokens_seen=step * args.batch * args.seq,
        train_loss=float(np.mean(losses[-window:])),
        eval_loss=final_eval,
        seconds=time.perf_counter() - start,
        devices=len(devices),
        processes=processes,
        config=run_config,
        losses=losses,
        evals=evals,
    )
    _plot(losses, evals, os.path.join(args.out, "loss.png"), f"{args.method} r={args.rank} on {type(model).__name__}")
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    torch_weights = any(os.path.isfile(os.path.join(args.model, w)) for w in WEIGHTS[2:])
    load = (
        "from transformers import AutoModelForCausalLM; from peft import PeftModel\n"
        f"model = AutoModelForCausalLM.from_pretrained({os.path.abspath(args.model)!r}"
        f"{'' if torch_weights else ', from_flax=True'})\n"
        f"model = PeftModel.from_pretrained(model, {os.path.abspath(adapter_dir)!r})"
    )
    eval_text = f"{final_eval:.4f}" if final_eval is not None else "- (no rows held out)"
    print(
        f"\ntrainable parameters  {n_factors:,}\n"
        f"tokens seen           {summary['tokens_seen']:,} ({step} steps x {args.batch} x {args.seq})\n"
        f"final train loss      {summary['train_loss']:.4f} (mean of the last {window} step(s))\n"
        f"final eval loss       {eval_text}\n"
        f"time                  {summary['seconds']:.0f} s\n"
        f"files                 {adapter_dir}/ (PEFT), {os.path.join(args.out, 'adapter.safetensors')} (LyCORIS), "
        f"{os.path.join(args.out, 'loss.png')}\n"
        f"load it in PEFT:\n{load}"
    )
    _written()
    return 0


def _put(tree: Any, shardings: Any) -> Any:
    """``tree``'s arrays (the same values on every process) placed by ``shardings`` (one, or a tree of
    them) over the devices of every process: each process puts its own devices' parts."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x: Any, sharding: Any) -> Any:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def _written() -> None:
    """Several processes: none ends before process 0 has written the final files."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lycoris-jax finetune: files written")


def _plot(losses: Sequence[float], evals: Sequence[Sequence[Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1.0, label="train")
    points = [(s, v) for s, v in evals if v is not None]
    if points:
        ax.plot(*zip(*points, strict=True), "o-", lw=1.2, label="eval (held out)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lycoris-jax finetune", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
