"""fp16 models' dZ: which staging keeps the gradients as accurate as a naive fp16 path with a GradScaler (issue 17).

dZ is formed in forward, so an upstream loss scale never reaches it: at a token mean over N tokens its entries are
about ``p_j / N``, under fp16's smallest normal (6e-5) for most columns. The bar is the naive fp16 path (the
reference backend, materialised logits, autograd) with a 2^16 upstream scale, GradScaler's initial one.

Measured against fp64 (norm-relative errors of dH and dW): the exact dZ (fp64 autograd through the reference on
the logits) rounded as each staging option would, then the dH and dW GEMMs from the rounded operands with fp32
accumulation (as tensor cores do) and the result rounded to fp16 (the model's gradient dtype) after the 2^16
scale. Options: fp16 as is (the code before issue 17), fp16 times a power of two (``1 / max(row_weight)`` rounded
up: what ``sdpo_ops.chunked`` does now), bf16 (the dH GEMM then needs a bf16 copy of the [V, H] weight, the dW GEMM
bf16 hidden states), fp32 (fp32 GEMMs: no tensor-core rate). Last, the real code, ``sdpo_loss(backend="torch")``
under the CUDA and the CPU device policy.

    python -m bench.fp16_staging [--tokens 4096 --hidden 64 --vocab 32768 --out bench/results/<machine>]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sdpo_ops import sdpo_loss, sdpo_loss_from_logits
from sdpo_ops.device_policy import CPU_POLICY, CUDA_POLICY, use_policy

UPSTREAM = 2.0**16
TOPK = 100


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def measure(tokens: int, hidden: int, vocab: int, seed: int = 0) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=generator).half()
    w = (torch.randn(vocab, hidden, generator=generator) * hidden**-0.5 * 2.5).half()
    th = torch.randn(tokens, hidden, generator=generator).half()
    tw = (torch.randn(vocab, hidden, generator=generator) * hidden**-0.5 * 2.5).half()
    options = {"topk": TOPK, "alpha": 0.5, "is_clip": None, "reduction": "token-mean"}

    logits = (h.double() @ w.double().t()).requires_grad_()
    sdpo_loss_from_logits(logits, th.double() @ tw.double().t(), **options).backward()
    dz = logits.grad
    del logits
    truth = {"dH": dz @ w.double(), "dW": dz.t() @ h.double()}
    # 2^-ceil(log2(max row weight)): the token mean's 1 / N, rounded up to a power of two
    scale = 2.0 ** -torch.ceil(torch.log2(torch.tensor(1.0 / tokens))).item()

    def staged(dtype: torch.dtype, factor: float) -> dict[str, float]:
        rounded = (dz * factor).to(dtype).float()
        operand_w = w.float() if dtype == torch.float16 else w.to(dtype).float()
        operand_h = h.float() if dtype == torch.float16 else h.to(dtype).float()
        if dtype == torch.float32:
            operand_w, operand_h = w.float(), h.float()
        grads = {"dH": rounded @ operand_w, "dW": rounded.t() @ operand_h}
        return {
            name: _error((grad * (UPSTREAM / factor)).half().double() / UPSTREAM, truth[name])
            for name, grad in grads.items()
        }

    results = {
        "fp16 staging, unscaled (before issue 17)": staged(torch.float16, 1.0),
        f"fp16 staging x 2^{int(torch.log2(torch.tensor(scale)).item())} (now)": staged(torch.float16, scale),
        "bf16 staging": staged(torch.bfloat16, 1.0),
        "fp32 staging": staged(torch.float32, 1.0),
    }

    def run(backend: str, upstream: float) -> dict[str, float]:
        leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        loss = sdpo_loss(leaves[0], leaves[1], th, tw, backend=backend, **options)
        (loss * upstream).backward()
        grads = dict(zip(("dH", "dW"), (leaf.grad for leaf in leaves), strict=True))
        return {name: _error(grad.double() / upstream, truth[name]) for name, grad in grads.items()}

    results["naive fp16 (reference), 2^16 upstream: the bar"] = run("reference", UPSTREAM)
    results["naive fp16 (reference), no loss scale"] = run("reference", 1.0)
    for label, policy in (("CUDA", CUDA_POLICY), ("CPU", CPU_POLICY)):
        with use_policy(policy):
            results[f"sdpo_loss torch backend, {label} policy, 2^16 upstream"] = run("torch", UPSTREAM)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = measure(args.tokens, args.hidden, args.vocab)
    lines = [
        f"fp16 dZ staging, N={args.tokens}, H={args.hidden}, V={args.vocab}, K={TOPK}, alpha 0.5, token-mean "
        "(norm-relative error against fp64)",
        "",
        "| option | dH | dW |",
        "|---|---:|---:|",
        *(f"| {name} | {errors['dH']:.2e} | {errors['dW']:.2e} |" for name, errors in results.items()),
    ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fp16_staging.md").write_text("\n".join(lines) + "\n")
        (args.out / "fp16_staging.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
