"""``python -m lowbit_tp.bench.e2e --worker CONFIG_JSON OUT_DIR``: one benchmark rank (internal)."""
import sys

from lowbit_tp.bench.e2e.worker import worker_main

if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        raise SystemExit("usage: python -m lowbit_tp.bench.e2e --worker CONFIG_JSON OUT_DIR (internal: one bench-e2e rank)")
    worker_main(*sys.argv[2:])
