"""The demo behind `./dev demo`: compile a zoo model for an edge cluster from the catalog, print the
plan and the schedule IR, then train a few iterations through the local backend (every device's
replica emulated in this process) and show the loss next to plain eager training."""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

import asteroid_fx as asteroid
from asteroid_fx import models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev demo", description=__doc__)
    parser.add_argument("--model", default="resnet18", choices=sorted(models.ZOO))
    parser.add_argument("--cluster", default="edge-4-1g", help="a preset, a cluster JSON file or device kinds")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8, help="rows per micro-batch")
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="the full-size model instead of the small config")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    entry = models.get(args.model)
    small = not args.full
    model = entry.build(small=small)
    batch = args.microbatches * args.rows
    started = time.perf_counter()
    compiled = asteroid.compile(model, args.cluster, example=entry.example(batch, small), loss=entry.loss,
                                microbatches=args.microbatches, stages=args.stages)
    print(f"== cluster\n{compiled.cluster}\n")
    print(f"== plan (compiled in {time.perf_counter() - started:.1f}s)\n{compiled.plan}\n")
    print(f"== program (schedule IR)\n{compiled.program}")

    torch.manual_seed(1)
    batches = [(entry.example(batch, small), entry.labels(batch, small)) for _ in range(args.iterations)]
    print(f"== training {args.iterations} iterations on the local backend (SGD, lr 0.05)")
    runner, losses = compiled.run(iter(batches), args.iterations, optimizer="sgd", lr=0.05)

    # Plain eager training on the same batches, for comparison (same for models without BatchNorm;
    # with BatchNorm the pipeline normalizes over each device's rows, so the curves differ slightly).
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(eager.parameters(), lr=0.05)
    for i, (inputs, labels) in enumerate(batches):
        loss = entry.loss(eager(*inputs), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"  iteration {i + 1}: pipeline loss {losses[i]:.4f}   eager loss {float(loss.detach()):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
