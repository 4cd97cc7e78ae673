"""The ``resnet-serve`` command, also ``python -m resnet_serve``.

Python's cyclic garbage collector is paused from here until the command has imported what it
needs (``cli.imports_done``). Start-up creates a few hundred thousand objects (pydantic's schemas,
FastAPI's routes, numpy) and frees almost none, so the collections they set off were pure cost:
the server's imports took 1.09 s without them against 1.21 s (``benchmarks/start_bench.py``,
2 × AMD EPYC).
"""

import gc

gc.disable()

from resnet_serve.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
