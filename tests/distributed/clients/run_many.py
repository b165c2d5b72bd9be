"""Run client scripts several times in one launch (a 2-rank launch costs 6-10 s of start-up):

    torchrun --nproc_per_node 2 tests/distributed/clients/run_many.py RUNS.json

RUNS.json: {"name": {"script": PATH, "argv": [...], "env": {VAR: value}}, ...}, run in order. Each run
calls its script's ``main(argv)`` in the same processes (the process group stays up between runs, so a
run that ends it, e.g. TRL's ``trainer.end()``, or one that is killed, must come last) with ``env`` set
for that run only; a run that raises or returns non-zero ends the launch.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path


def load(script: Path):
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    runs = json.loads(Path(sys.argv[1]).read_text())
    for name, run in runs.items():
        print(f"=== run {name}", flush=True)
        t0 = time.perf_counter()
        saved = {k: os.environ.get(k) for k in run.get("env", {})}
        os.environ.update(run.get("env", {}))
        try:
            code = load(Path(run["script"])).main(run["argv"])
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if code:
            raise SystemExit(f"run {name} returned {code}")
        print(f"=== run {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        gc.collect()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
