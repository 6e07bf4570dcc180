"""The demo behind `./dev demo`: compile a zoo model for an edge cluster from the catalog, print the
plan and the schedule IR, then train a few iterations on one worker process per device
(torch.distributed, gloo on loopback) and show the loss next to the local backend (the IR's
reference meaning, every device's replica in this process) and plain eager training."""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time

import torch

import asteroid_fx as asteroid
from asteroid_fx import models
from asteroid_fx.launch import RunSpec, launch, pinned
from asteroid_fx.launch import batches as iter_batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev demo", description=__doc__)
    parser.add_argument("--model", default="resnet18", choices=sorted(models.ZOO))
    parser.add_argument("--cluster", default="edge-4-1g", help="a preset, a cluster JSON file or device kinds")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="rows per iteration")
    parser.add_argument("--microbatches", type=int, default=None, help="default: the planner chooses")
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="the full-size model instead of the small config")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the worker run is stopped")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    entry = models.get(args.model)
    small = not args.full
    model = entry.build(small=small)
    batch = args.batch
    started = time.perf_counter()
    torch.manual_seed(0)
    compiled = asteroid.compile(model, args.cluster, example=entry.example(batch, small), loss=entry.loss,
                                microbatches=args.microbatches, stages=args.stages)
    print(f"== cluster\n{compiled.cluster}\n")
    print(f"== plan (compiled in {time.perf_counter() - started:.1f}s)\n{compiled.plan}\n")
    print(f"== program (schedule IR)\n{compiled.program}")

    spec = pinned(RunSpec(model=f"{args.model}{'' if args.full else ':small'}", batch=batch,
                          microbatches=compiled.plan.microbatches, iterations=args.iterations, optimizer="sgd", lr=0.05),
                  compiled.plan)
    print(f"== training {args.iterations} iterations on {len(compiled.program.devices)} worker processes (SGD, lr 0.05)")
    with tempfile.TemporaryDirectory() as out:
        result = launch(spec, compiled.cluster, out, timeout_s=args.timeout, log=print)
    batches = list(iter_batches(spec))
    _, losses = compiled.run(iter(batches), args.iterations, optimizer="sgd", lr=0.05)

    # Plain eager training on the same batches, for comparison (same for models without BatchNorm;
    # with BatchNorm the pipeline normalizes over each device's rows, so the curves differ slightly).
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(eager.parameters(), lr=0.05)
    for i, (inputs, labels) in enumerate(batches):
        loss = entry.loss(eager(*inputs), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"  iteration {i + 1}: workers {result['losses'][i]:.4f}   local backend {losses[i]:.4f}   "
              f"eager {float(loss.detach()):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
