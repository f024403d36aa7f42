"""Where the time of the CPU rot-* kernels goes: the same kernels built with phases left out.

Builds ``lowbit_tp/kernels/cpu_kernels.cpp`` once per ``-DLBT_SKIP=mask`` (a bit per phase;
the results are wrong, the memory traffic stays) and times encode and decode-and-sum of a
fixed ``[tokens, E]`` fp32 message on one thread, interleaved with a same-size copy
(``x.clone()``) in the same loop, as ``bench-comm``'s codec-speed rows do. The drop in time
when a phase is left out is what that phase costs (phases overlap in an out-of-order core,
so the drops need not add up).

    PYTHONPATH=. python3 scripts/cpu_kernel_profile.py --codec rot-lm4-g64-lg8-k4 --hidden 576 640 2048

Writes nothing unless ``--json`` is given; prints a markdown table (GB/s of the fp32
message and the ratio to the copy).
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lowbit_tp.calibration.synthetic import synthetic_calibration
from lowbit_tp.codecs import make_codec
from lowbit_tp.kernels import cpu
from lowbit_tp.results import json_text

PHASES = {  # LBT_SKIP bits (see cpu_kernels.cpp)
    "enc: hadamard": 2, "enc: group absmax": 4, "enc: scales": 8, "enc: division": 16,
    "enc: level search": 32, "enc: division+search": 48, "enc: packing": 64,
    "dec: unpack": 128, "dec: levels x scale": 256, "dec: hadamard": 512, "dec: row write-out": 1024,
}


def build(mask: int, out_dir: Path, extra: tuple[str, ...] = (), source: Path = cpu.SOURCE, tag: str = "") -> ctypes.CDLL:
    key = hashlib.sha256(Path(source).read_bytes() + repr((mask, extra, cpu.FLAGS)).encode()).hexdigest()[:12]
    so = out_dir / f"k{mask}{tag}_{key}.so"
    if not so.exists():
        cmd = ["g++", *cpu.FLAGS, "-march=native", *extra, f"-DLBT_SKIP={mask}", str(source), "-o", str(so)]
        subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(so))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.lbt_rot_encode.argtypes = [p, i32, i64, i64, p, p, f32, p, i32, f32, f32, p, p]
    lib.lbt_rot_encode.restype = i32
    lib.lbt_rot_decode_sum.argtypes = [p, i32, i64, p, p, f32, p, p, i32]
    return lib


def time_variants(libs: dict, codec_name: str, tokens: int, e: int, repeats: int) -> dict:
    layer = "bench"
    cal = synthetic_calibration([layer], world=2, hidden=e, tokens=256, batches=1)
    codec = make_codec(codec_name, calibration=cal, backend="cpu")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(tokens, e, generator=g) * 3 for _ in range(2)]
    args = codec._cpu_args(e)
    params = [codec.params(layer, r, e) for r in range(2)]
    nbytes = codec.payload_nbytes((tokens, e))
    tables = cpu._ptrs(args["tables"])
    payloads = [codec.encode(x, layer=layer, source=r) for r, x in enumerate(xs)]
    pl = cpu._ptrs(payloads)
    outl = cpu._ptrs([p.outliers for p in params])
    out = torch.empty(nbytes, dtype=torch.uint8)
    amax = ctypes.c_float()
    x = xs[0]

    def enc(lib):
        return lambda: lib.lbt_rot_encode(x.data_ptr(), 0, tokens, e, params[0].outliers.data_ptr(),
                                          args["spec"].data_ptr(), args["inv_sqrt_block"], tables, 0,
                                          2.0 ** 100, 3e38, out.data_ptr(), ctypes.byref(amax))

    def dec(lib):
        def run():  # a fresh fp32 sum per call, as decode_sum allocates it
            s = torch.empty(tokens, e)
            lib.lbt_rot_decode_sum(pl, 2, tokens, outl, args["spec"].data_ptr(), args["inv_sqrt_block"], tables,
                                   s.data_ptr(), 0)
        return run

    fns = {"memcpy": lambda: x.clone()}
    for name, lib in libs.items():
        fns[f"enc|{name}"] = enc(lib)
        fns[f"dec|{name}"] = dec(lib)
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.thread_time()
            fn()
            times[k].append(time.thread_time() - t0)
    gb = x.numel() * 4 / 1e9
    return {k: gb / statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codec", default="rot-lm4-g64-lg8-k4")
    ap.add_argument("--hidden", type=int, nargs="+", default=[576, 640, 2048])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--phases", nargs="*", default=list(PHASES), help="phase names to leave out, one at a time")
    ap.add_argument("--baseline", default=None, help="another cpu_kernels.cpp to time next to this one (e.g. main's)")
    ap.add_argument("--no-avx512", action="store_true", help="also time this source built with -mno-avx512f")
    ap.add_argument("--flags", action="append", default=[], help="an extra build of this source, e.g. --flags=-DLBT_TWO_PASS=1 (repeatable)")
    ap.add_argument("--build-dir", default=None, help="keep the builds here (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if a.build_dir:
            tmp = a.build_dir
            Path(tmp).mkdir(parents=True, exist_ok=True)
        libs = {"full": build(0, Path(tmp))}
        if a.baseline:
            libs["baseline"] = build(0, Path(tmp), source=Path(a.baseline), tag="base")
        if a.no_avx512:
            libs["full -mno-avx512f"] = build(0, Path(tmp), extra=("-mno-avx512f",))
        for flag in a.flags:
            libs[f"full {flag}"] = build(0, Path(tmp), extra=(flag,))
        for ph in a.phases:
            libs[f"-{ph}"] = build(PHASES[ph], Path(tmp))
        rows = []
        for e in a.hidden:
            g = time_variants(libs, a.codec, a.tokens, e, a.repeats)
            for name in libs:
                rows.append({"codec": a.codec, "shape": f"[{a.tokens}, {e}]", "variant": name,
                             "memcpy_gbps": g["memcpy"], "encode_gbps": g[f"enc|{name}"],
                             "decode_sum_gbps": g[f"dec|{name}"],
                             "encode_vs_memcpy": g[f"enc|{name}"] / g["memcpy"],
                             "decode_sum_vs_memcpy": g[f"dec|{name}"] / g["memcpy"]})
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    if a.json:
        Path(a.json).write_text(json_text(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
