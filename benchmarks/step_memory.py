"""Peak memory of the Belief Predictor's softmax losses: dense (N, K) logits against the chunked ops.

    python -m benchmarks.step_memory [--rows 50176] [--codes 4096] [--code-dim 64] [--out FILE.json]

The three losses over a softmax of every code (``L_bp`` cross-entropy, the batch-mean belief of
``L_ent`` and the context KL; :mod:`pacofr.models.code_softmax`) are run forward and backward at a
realistic shape (default: ViT-B/16, batch 256 -> N = 256 x 196 patches, K = 4096 codes, dc = 64),
once as the dense autograd formulation (the (N, K) logits, their softmax and gradients) and once
through ``code_softmax``. Each variant runs in a fresh process; its peak resident memory
(``ru_maxrss``) minus the resident memory after the inputs were made is the step's working memory.
CPU memory: the same buffers a GPU would allocate, without the caching allocator's rounding.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

from pacofr.models import code_softmax

VARIANTS = ("dense", "chunked")
TAU = 0.1


def _rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def dense_losses(q: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor, q_target: torch.Tensor) -> torch.Tensor:
    """The three losses by autograd through the dense (N, K) logits (sum, 0-d)."""
    logits = q @ codes.T / TAU
    ce = torch.nn.functional.cross_entropy(logits, labels)
    log_probs = logits.log_softmax(dim=1)
    mean_probs = log_probs.exp().mean(dim=0)
    entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
    target = (q_target @ codes.detach().T / TAU).log_softmax(dim=1)  # the target belief is a constant
    kl = (target.exp() * (target - log_probs)).sum(dim=1).mean()
    return ce - entropy + kl


def chunked_losses(q: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor, q_target: torch.Tensor) -> torch.Tensor:
    """The same three losses through :mod:`pacofr.models.code_softmax` (no (N, K) buffer)."""
    ce, _ = code_softmax.code_cross_entropy(q, codes, labels, TAU)
    mean_probs = code_softmax.mean_code_probs(q, codes, TAU)
    entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
    kl = code_softmax.code_kl(q, codes, q_target, TAU)
    return ce - entropy + kl


def measure(variant: str, rows: int, codes: int, code_dim: int) -> dict[str, float]:
    """Run one variant in this process: loss, gradient norms and memory (MiB)."""
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(rows, code_dim), dim=1).requires_grad_()
    book = torch.nn.functional.normalize(torch.randn(codes, code_dim), dim=1).requires_grad_()
    labels = torch.randint(0, codes, (rows,))
    q_target = torch.nn.functional.normalize(torch.randn(rows, code_dim), dim=1)
    before = _current_rss_mib()
    peak_before = _rss_mib()
    loss = (dense_losses if variant == "dense" else chunked_losses)(q, book, labels, q_target)
    loss.backward()
    peak = _rss_mib()
    return {"loss": float(loss), "grad_q_norm": float(q.grad.norm()), "grad_codes_norm": float(book.grad.norm()),
            "rss_after_inputs_mib": before, "peak_rss_mib": peak,
            # an upper bound when the step stayed below the high-water mark of the set-up
            "step_peak_mib": peak - before, "below_setup_peak": peak <= peak_before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256 * 196)
    parser.add_argument("--codes", type=int, default=4096)
    parser.add_argument("--code-dim", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write the JSON record here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args.rows, args.codes, args.code_dim)))
        return 0
    results = {}
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, "-m", "benchmarks.step_memory", "--variant", variant,
                                "--rows", str(args.rows), "--codes", str(args.codes),
                                "--code-dim", str(args.code_dim)], capture_output=True, text=True, check=True)
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    dense, chunked = results["dense"], results["chunked"]
    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} CPU", "torch": torch.__version__,
              "shape": {"rows": args.rows, "codes": args.codes, "code_dim": args.code_dim, "tau": TAU},
              "dense_logits_mib": args.rows * args.codes * 4 / 2**20, "results": results,
              "loss_abs_diff": abs(dense["loss"] - chunked["loss"]),
              "peak_ratio": dense["step_peak_mib"] / max(chunked["step_peak_mib"], 1e-9)}
    text = json.dumps(record, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
