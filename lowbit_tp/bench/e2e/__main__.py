"""``python -m lowbit_tp.bench.e2e --worker CONFIG_JSON OUT_DIR``: one benchmark rank (internal)."""
import argparse

from lowbit_tp.bench.e2e.worker import worker_main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="bench-e2e rank process (internal)")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG_JSON", "OUT_DIR"), required=True)
    worker_main(*ap.parse_args().worker)
