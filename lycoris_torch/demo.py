"""Fine-tune a small torch model with LoKr and LoHa, save PEFT files, and prove real PEFT loads them.

Run: ``python -m lycoris_torch.demo [--steps N] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from torch import nn

import lycoris_torch as lt


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(32, 64), nn.Linear(64, 64)])
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x).squeeze(-1)


def _task(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=g)
    y = torch.sin(x[:, :4].sum(-1)) + 0.5 * x[:, 4] * x[:, 5]
    return x, y


def run(kind: str, steps: int, out: str) -> dict[str, float]:
    torch.manual_seed(0)
    base = TinyMLP()
    x, y = _task()
    cfg_cls, tuner_cls = (lt.LoKrConfig, lt.LoKrModel) if kind == "lokr" else (lt.LoHaConfig, lt.LoHaModel)
    tuner = tuner_cls(copy.deepcopy(base), cfg_cls(r=4, alpha=8, target_modules=["layers.0", "layers.1"]))
    opt = torch.optim.Adam([p for p in tuner.parameters() if p.requires_grad], lr=1e-2)
    start = time.perf_counter()
    first = None
    for _ in range(steps):
        loss = ((tuner(x) - y) ** 2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuner.eval()
    final = ((tuner(x) - y) ** 2).mean().item()
    tuner.save_pretrained(out)
    result = {"loss_start": first, "loss_end": final, "seconds": time.perf_counter() - start}
    with torch.no_grad():
        ours = tuner(x)
        try:
            import peft
        except ImportError:
            result["peft_max_abs_diff"] = float("nan")
        else:
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()(x)
            result["peft_max_abs_diff"] = (theirs - ours).abs().max().item()
        merged = lt.LycorisTuner.from_pretrained(copy.deepcopy(base), out).merge_and_unload()
        result["merged_max_abs_diff"] = (merged(x) - ours).abs().max().item()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=None, help="directory for the adapters (default: a temp dir)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="lycoris-demo-")
    ok = True
    for kind in ("lokr", "loha"):
        r = run(kind, args.steps, f"{out}/{kind}")
        print(
            f"{kind}: loss {r['loss_start']:.4f} -> {r['loss_end']:.2e} in {r['seconds']:.1f}s; "
            f"PEFT reload max|diff| {r['peft_max_abs_diff']:.2e}; merged max|diff| {r['merged_max_abs_diff']:.2e}; "
            f"saved to {out}/{kind}"
        )
        ok &= (
            r["loss_end"] < 0.5 * r["loss_start"] and r["peft_max_abs_diff"] < 1e-5 and r["merged_max_abs_diff"] < 1e-4
        )
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
