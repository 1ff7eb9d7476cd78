"""Multi-host, run for real: several JAX processes on this machine (gloo collectives on loopback),
each with its own simulated devices, train one sharded adapter as a TPU pod's hosts do, and save
it from process 0 (``tests/multihost``)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.multihost.harness import HostsFailed, run_hosts


@pytest.mark.parametrize(
    "scenario",
    ["pytree-fsdp", "pytree-fsdp-loha", "pytree-fsdp-tp", "pytree-fsdp-tp-loha", "nnx-mlp", "nnx-mlp-lokr",
     "nnx-mlp-tp", "nnx-mlp-lokr-tp"],
)  # fmt: skip
def test_two_processes_of_four_devices_train_as_one_of_eight_and_save_from_process_0(scenario, tmp_path):
    from safetensors.numpy import load_file

    two = run_hosts(scenario, processes=2, devices=4, out=tmp_path / "two")
    one = run_hosts(scenario, processes=1, devices=8, out=tmp_path / "one")
    assert [r["devices"] for r in two] == [8, 8] and [r["process"] for r in two] == [0, 1]
    np.testing.assert_allclose(two[0]["losses"], one[0]["losses"], rtol=1e-6)
    np.testing.assert_allclose(two[1]["losses"], one[0]["losses"], rtol=1e-6)
    a, b = (
        load_file(tmp_path / "two" / "adapter_model.safetensors"),
        load_file(tmp_path / "one" / "adapter_model.safetensors"),
    )
    loha = "loha" in scenario or (scenario.startswith("nnx") and "lokr" not in scenario)  # nnx-mlp: LoHa
    assert sorted(a) == sorted(b) and len(a) == (8 if loha else 4)  # LoHa: 4 a layer, LoKr 2
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)
    lycoris, single = load_file(tmp_path / "two.safetensors"), load_file(tmp_path / "one.safetensors")
    assert sorted(lycoris) == sorted(single) and len(lycoris) >= 4  # and the LyCORIS file, from process 0 too
    for key in lycoris:
        np.testing.assert_allclose(lycoris[key], single[key], rtol=1e-5, atol=1e-7)


def test_a_failing_process_stops_the_run_with_its_output():
    with pytest.raises(HostsFailed, match="process"):
        run_hosts("no-such-scenario", processes=2, devices=2, out="unused", timeout=120)


@pytest.mark.parametrize("scenario", ["linen-llama", "linen-llama-lokr", "linen-llama-tp", "linen-llama-lokr-tp"])
def test_transformers_llama_through_the_linen_transform_on_two_processes_loads_in_peft(scenario, tmp_path):
    import warnings

    import jax
    import peft
    import torch
    from transformers import FlaxLlamaForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    from lycoris_jax import linen
    from tests.multihost.worker import LLAMA

    two = run_hosts(scenario, processes=2, devices=4, out=tmp_path / "two")
    one = run_hosts(scenario, processes=1, devices=8, out=tmp_path / "one")
    np.testing.assert_allclose(two[0]["losses"], one[0]["losses"], rtol=1e-5)
    assert two[0]["losses"][-1] < two[0]["losses"][0]
    assert (tmp_path / "two.safetensors").is_file()  # the LyCORIS file, from process 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flax_model = FlaxLlamaForCausalLM(LlamaConfig(**LLAMA), seed=0)
        torch_model = load_flax_weights_in_pytorch_model(LlamaForCausalLM(LlamaConfig(**LLAMA)), flax_model.params)
    ids = np.arange(12)[None] % LLAMA["vocab_size"]
    adapted, lycoris = linen.from_pretrained(tmp_path / "two", flax_model.module, flax_model.params)
    positions = np.arange(12)[None]
    ours = adapted.apply({"params": flax_model.params, "lycoris": lycoris}, ids, np.ones_like(ids), positions).logits
    theirs = peft.PeftModel.from_pretrained(torch_model.eval(), tmp_path / "two")
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jax.device_get(ours)), expected, atol=1e-4)


def test_a_process_that_dies_mid_run_stops_the_others_with_an_error_in_bounded_time(tmp_path):
    ended = run_hosts("dies", processes=2, devices=2, out=tmp_path, timeout=120, wait_all=True)
    assert ended[1]["exit"] == 3  # the one that died
    survivor = ended[0]
    assert survivor["exit"] != 0, survivor["output"]  # it did not carry on, nor finish as if nothing happened
    assert survivor["seconds"] < 90, survivor["seconds"]  # and it did not hang: the heartbeat timeout is 10 s
    assert "stopped sending heartbeats" in survivor["output"]  # JAX's coordination service says why


def test_an_orbax_checkpoint_of_two_processes_resumes_on_one_and_on_four_to_the_same_losses(tmp_path):
    whole = run_hosts("pytree-fsdp", processes=1, devices=8, out=tmp_path / "whole")[0]["losses"]
    saved = run_hosts("save", processes=2, devices=4, out=tmp_path / "ckpt")
    np.testing.assert_allclose(saved[0]["losses"], whole[:2], rtol=1e-6)
    for processes, devices in ((1, 8), (4, 2)):
        resumed = run_hosts("resume", processes=processes, devices=devices, out=tmp_path / "ckpt")
        assert len(resumed) == processes
        np.testing.assert_allclose(resumed[0]["losses"], whole[2:], rtol=1e-6)


def test_a_save_interrupted_on_process_0_leaves_the_previous_checkpoint(tmp_path):
    import hashlib
    import json

    from lycoris_jax import pytree

    out = tmp_path / "adapter"
    ended = run_hosts("interrupted-save", processes=2, devices=2, out=out, timeout=120, wait_all=True)
    assert ended[0]["exit"] == -9  # process 0 was killed in the middle of writing the second save
    assert ended[1]["exit"] != 0 and ended[1]["seconds"] < 90  # process 1 stopped, it did not wait forever
    before = json.loads(next(line for line in ended[0]["stdout"].splitlines() if line.startswith("RESULT "))[7:])
    files = sorted(p for p in out.rglob("*") if p.is_file())
    after = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    assert after == before["digest"]  # the first save, byte for byte
    assert pytree.read_config(out).r == 4


def test_finetune_started_once_per_host_trains_as_one_process_stops_together_and_resumes_on_another_count(
    tmp_path,
):
    """``lycoris-jax finetune`` on 2 processes x 4 devices, started once per simulated host as on a pod
    (``--coordinator/--num-processes/--process-id``). Ctrl-C on process 1 alone stops both after the
    same step, saved; the checkpoint resumes on 1 process x 8 devices and then on 2 x 4 again, to the
    losses of one uninterrupted process of 8 devices; process 0 alone prints and writes the final files."""
    import json
    import signal
    import sys

    from tests.finetune_fixture import make_checkpoint, sonnets
    from tests.multihost.harness import failed, free_port, start

    make_checkpoint(str(tmp_path / "model"))
    (tmp_path / "data.txt").write_text(sonnets(), encoding="utf-8")

    def finetune(out, processes, devices, steps, *extra, watch=None, expect=0):
        port, command = free_port(), [sys.executable, "-m", "lycoris_cli", "finetune"]
        common = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.txt"), "--seq", "64",
                  "--batch", "8", "--lr", "1e-2", "--save-every", "2", "--steps", str(steps), "--out", str(out)]  # fmt: skip

        def hosts(i):
            return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]

        what = f"finetune on {processes} x {devices}"
        runs = start(
            [[*command, *common, *extra, *(hosts(i) if processes > 1 else [])] for i in range(processes)],
            devices, timeout=420, what=what, watch=watch, wait_all=expect != 0,
        )  # fmt: skip
        if any(r["exit"] != expect for r in runs):
            raise failed(what, runs)
        return runs

    def summary(out):
        return json.loads((out / "summary.json").read_text())

    finetune(tmp_path / "one", 1, 8, 4)
    one = summary(tmp_path / "one")

    out, sent = tmp_path / "two", []

    def interrupt_process_1(procs):  # once step 2 is saved: training is under way on both
        if not sent and (out / "checkpoints" / "2").is_dir():
            procs[1].send_signal(signal.SIGINT)
            sent.append(True)

    runs = finetune(out, 2, 4, 100000, watch=interrupt_process_1, expect=130)
    assert "8 device(s) in 2 processes" in runs[0]["output"] and "saved; continue" in runs[0]["output"]
    saved = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved >= 2
    finetune(out, 1, 8, max(4, saved + 1), "--resume")  # the checkpoint of 2 processes, on 1
    assert summary(out)["processes"] == 1
    np.testing.assert_allclose(summary(out)["losses"][:4], one["losses"], rtol=1e-6)
    steps = summary(out)["steps"]
    runs = finetune(out, 2, 4, steps + 1, "--resume")  # and back on 2
    done = summary(out)
    assert done["processes"] == 2 and done["steps"] == steps + 1
    np.testing.assert_allclose(done["losses"][:4], one["losses"], rtol=1e-6)
    assert "trainable parameters" in runs[0]["output"] and "trainable parameters" not in runs[1]["output"]
    for name in ("adapter/adapter_model.safetensors", "adapter.safetensors", "loss.png"):
        assert (out / name).is_file(), name
