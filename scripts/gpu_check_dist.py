"""`darkmatter` in a process group of one under torchrun (gpu_check's NCCL check).

``sae_darkmatter.distributed.init`` joins a process group only when ``torchrun`` starts more
than one rank, so ``torchrun --nproc-per-node 1 darkmatter ...`` never touches NCCL. With one
GPU, this driver joins the group itself (NCCL on CUDA, gloo on the CPU), does one all-reduce
and one object gather through it, and then runs the real CLI, whose stages then take their
distributed paths (shard ownership, gathered float64 sums, barriers) through that backend.

    torchrun --standalone --nproc-per-node 1 scripts/gpu_check_dist.py OUT.json run ... -o DIR

It writes ``OUT.json`` (backend, world size, the collectives' results) before running the CLI
and exits with the CLI's exit code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.cuda.nccl
import torch.distributed as dist


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    report, cli_args = Path(argv[0]), argv[1:]
    cuda = torch.cuda.is_available() and "cpu" not in cli_args
    torch.backends.cuda.matmul.allow_tf32 = False  # as gpu_check.py: exact float32 GEMMs
    torch.backends.cudnn.allow_tf32 = False
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    t = torch.arange(4, dtype=torch.float64, device=device) + dist.get_rank()
    dist.all_reduce(t)
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": dist.get_rank()})
    info = {
        "backend": dist.get_backend(),
        "world_size": dist.get_world_size(),
        "all_reduce": t.cpu().tolist(),
        "gathered": gathered,
        "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "device": str(device),
    }
    report.write_text(json.dumps(info))

    from sae_darkmatter.cli import app  # after the group is up: the stages see it

    try:
        # standalone_mode=False: click returns a typer.Exit's code instead of exiting
        code = app(cli_args, standalone_mode=False)
    finally:
        if dist.is_initialized():  # the CLI leaves the group itself when it succeeds
            dist.destroy_process_group()
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
