"""The command line refuses bad arguments when it parses them, before any work: one line naming
the option, what it got and what it takes, no traceback."""

from __future__ import annotations

import pytest
import torch

from asteroid_fx.cli import main


@pytest.fixture()
def paths(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    return {"FILE": str(afile), "DIR": str(tmp_path), "OUT": str(tmp_path / "out")}


CASES = [
    ("compile mlp:small --cluster edge-4-1g --out FILE", "--out: .* exists and is not a folder"),
    ("compile mlp:small --cluster edge-4-1g --out FILE/x", "--out: .* which is a file, not a folder"),
    ("compile mlp:small --cluster DIR --out OUT", "--cluster: .* is not a cluster file"),
    ("compile mlp:small --cluster edge-4-1g --out OUT --batch -4", "--batch: -4 is out of range: give 1 or more"),
    ("compile mlp:small --cluster edge-4-1g --out OUT --batch 10000000000", "--batch: .* out of range"),
    ("compile mlp:small --cluster edge-4-1g --out OUT --max-layers 0", "--max-layers: 0 is out of range"),
    ("compile mlp:small --cluster edge-4-1g --out OUT --profile DIR", "--profile: .* is not a regular file"),
    ("launch mlp:small --cluster host-3 --listen 127.0.0.1:99999", "--listen: .* port of 0 to 65535"),
    ("launch mlp:small --cluster host-3 --iterations 0", "--iterations: 0 is out of range"),
    ("launch mlp:small --cluster host-3 --iterations -1", "--iterations: -1 is out of range"),
    ("launch mlp:small --cluster host-3 --lr nan", "--lr: 'nan' is out of range"),
    ("launch mlp:small --cluster host-3 --dilation 0", "--dilation: '0' is out of range"),
    ("launch mlp:small --cluster host-3 --checkpoint-every -2", "--checkpoint-every: -2 is out of range"),
    ("launch mlp:small --cluster host-3 --optimizer nosuch", "unknown optimizer 'nosuch'"),
    ("launch mlp:small --cluster host-3 --kill host9@0.1", "'host9' is not a device of the cluster"),
    ("launch mlp:small --cluster host-3 --kill host1@-3", "seconds 0 or more"),
    ("launch mlp:small --cluster host-3 --new-cluster", "--new-cluster goes with --resume"),
    ("check DIR --rtol -1", "--rtol: '-1' is out of range"),
    ("simulate DIR --optimizer-state -5", "--optimizer-state: '-5' is out of range"),
    ("profile --threads -2", "--threads: -2 is out of range"),
    ("profile --model mlp:small --device nosuch --out OUT", "--device: 'nosuch' is not a torch device"),
    ("worker --coordinator 127.0.0.1:1 --connect-timeout -1", "--connect-timeout: '-1' is out of range"),
]
if not torch.cuda.is_available():
    CASES.append(("profile --model mlp:small --device cuda --out OUT", "--device: 'cuda': this machine has no CUDA"))


@pytest.mark.parametrize("line, message", CASES, ids=[c[0] for c in CASES])
def test_a_bad_argument_is_one_clear_line(line, message, paths, capsys):
    argv = [next((v + w[len(k):] for k, v in paths.items() if w.startswith(k)), w) for w in line.split()]
    with pytest.raises(SystemExit) as stopped:
        code = main(argv)
        raise SystemExit(code)
    assert stopped.value.code not in (0, None)
    err = capsys.readouterr().err + (stopped.value.code if isinstance(stopped.value.code, str) else "")
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err
