"""asteroid export: a run's newest checkpoint as the model's state_dict."""

from __future__ import annotations

import argparse

from asteroid_fx.cli import args as args_


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="write a run's newest checkpoint as the model's state_dict (torch.save)")
    e.add_argument("run", help="the run folder (launch --out), or one of its checkpoints/it_<k> folders")
    e.add_argument("out", type=args_.out_file, help="the file to write, e.g. model.pt; model.load_state_dict(torch.load(out, "
                   "weights_only=True), strict=True) loads it")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asteroid_fx.runtime.checkpoint import export_state, find

    manifest = find(args.run)
    path = export_state(args.run, args.out)
    print(f"wrote the state_dict of {manifest['model']} after {manifest['iteration']} iterations "
          f"({len(manifest['keys'])} tensors) to {path}")
    return 0
