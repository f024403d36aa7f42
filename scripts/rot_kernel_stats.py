"""Static evidence for the rot-* Triton kernels without a GPU: compile each kernel for sm_90 at
the launch configuration an ``[8192, 8192]`` message gets, and report what ``ptxas -v`` and
the SASS say (registers, stack/spill bytes, instructions, shuffles, CTA barriers, global loads).

A proxy for speed, not a measurement: fewer spills, barriers and instructions per value are
what the GPU run (scripts/gpu_check.py) should then show as bandwidth.

    PYTHONPATH=. python3 scripts/rot_kernel_stats.py                    # the working tree
    PYTHONPATH=. python3 scripts/rot_kernel_stats.py --rev 2d65101      # an older triton_rotation.py
    PYTHONPATH=. python3 scripts/rot_kernel_stats.py --out docs/bench/rot_kernel_stats.md

``--rev`` compiles that revision's ``lowbit_tp/kernels/triton_rotation.py`` (with today's
``triton_common.py``), at that revision's own launch configuration.
"""
from __future__ import annotations

import argparse
import inspect
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

T = E = 8192
GROUP, BLOCK = 64, 256  # rot-lm4-g64-lg8-k4 / rot-int6-g64-lg8-k4 at E = 8192
P = ("*u8",)
COMMON = {"signs_ptr": "*fp32", "lg8_ptr": "*fp32", "T": "i32", "E": "i32", "G": "i32", "NK": "i32", "NCB": "i32",
          "inv_sqrt_b": "fp32"}
ENC = {**COMMON, "x_ptr": "*fp32", "colmap_ptr": "*i32", "bounds_ptr": "*fp32", "lg8_asc_ptr": "*fp32",
       "head_ptr": "*i16", "code_ptr": "*u8", "scale_ptr": "*u8", "flag_ptr": "*i32", "range_ptr": "*i32",
       "max_in": "fp32", "rotate_max": "fp32", "scale_max": "fp32", "cell_lo_ptr": "*i32", "cell_bnd_ptr": "*fp32",
       "lg8_cnt_ptr": "*i32", "lg8_thr_ptr": "*fp32"}
DEC = {**COMMON, "colmap_ptr": "*i32", "levels_ptr": "*fp32", "out_ptr": "*fp32", "CODE_OFF": "i32",
       "SCALE_OFF": "i32"}
RED = {**ENC, "dec_colmap_ptr": "*i32", "enc_colmap_ptr": "*i32", "levels_ptr": "*fp32", "CODE_OFF": "i32",
       "SCALE_OFF": "i32"}


def load_module(rev: str | None):
    if rev is None:
        from lowbit_tp.kernels import triton_rotation
        return triton_rotation
    src = subprocess.run(["git", "show", f"{rev}:lowbit_tp/kernels/triton_rotation.py"], capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "rot_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("rot_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cell(K) -> dict:
    """The cell level search's constexpr where the module has one and its config turns it on
    (K = 64 cells: what bucket_cells picks for the 4-bit Lloyd-Max and int6 bounds)."""
    if not hasattr(K, "bucket_cells"):
        return {}
    cell = bool(K.CONFIG.get("cell"))
    return {"LOG2K": 6 if cell else 0, **({"LG8C": True} if K.CONFIG.get("lg8_cell") else {})}


def _asm(K, key: str = "asm_enc", bits: int = 4) -> dict:
    """Elementwise inline-PTX table reads where the module has them and its config turns them on."""
    on = K.CONFIG.get(key) if hasattr(K, "_gather32") else False
    on = bits in on if isinstance(on, (tuple, list, set, frozenset)) else bool(on)
    return {"ASM": True} if on else {}


def _xpose(K, bits: int) -> dict:
    """The bit-transpose packing's constexpr where the module has one (bit-plane codes only)."""
    return {"XPOSE": bool(K.CONFIG.get("xpose")) and bits not in (4, 8)} if hasattr(K, "_xpose8_32") else {}


def cases(K):
    """(label, kernel, signature, constexprs, warps, values per thread per tile) at [8192, 8192]."""
    out = []
    for bits in (4, 6):
        for mode, flags in (("propagate", False), ("error", True)):
            if hasattr(K, "tile_config"):
                if hasattr(K, "encode_config"):
                    rows, w, warps, one = K.encode_config(T, E, GROUP, BLOCK)
                    one = {"ONE": one}
                else:
                    (rows, w, warps), one = K.tile_config(T, E, GROUP, BLOCK), {}
                const = {"ROWS": rows, "W": w, "GROUP": GROUP, "SPLIT": 1, **_cell(K), **_xpose(K, bits), **one, **_asm(K, "asm_enc", bits)}
            else:
                rows, w, gw, warps = K.launch_config(T, E, GROUP)
                const = {"ROWS": rows, "E_PAD": w, "GW": gw}
            const.update(B=BLOCK, LOG2B=8, BITS=bits, FMT=2, HAS_K=True, FLAG=flags, RANGE=flags)
            out.append((f"encode {bits}-bit {mode}", K.rot_encode_kernel, ENC, const, warps, rows * w // (32 * warps)))
        for n in (2, 8):
            const = {"N": n, "B": BLOCK, "LOG2B": 8, "GROUP": GROUP, "BITS": bits, "FMT": 2, "HAS_K": True,
                     **_xpose(K, bits), **_asm(K, "asm_dec", bits),
                     **({"LOOP": True} if K.CONFIG.get("dec_loop") and n > 2 else {})}
            if hasattr(K, "tile_config"):
                # older trees' tile_config has no loop parameter (and sized the loop like the unrolled kernel)
                takes_loop = "loop" in inspect.signature(K.tile_config).parameters
                loop = {"loop": True} if takes_loop and K.CONFIG.get("dec_loop") and n > 2 else {}
                rows, w, warps = K.tile_config(T, E, GROUP, BLOCK, n, **loop)
                const.update(ROWS=rows, W=w, PACKED=True)
            else:
                rows, w, _, warps = K.launch_config(T, E, GROUP)
                const.update(ROWS=rows, E_PAD=w)
            out.append((f"decode-sum {bits}-bit N={n}", K.rot_decode_sum_kernel, {**DEC, "payloads": P * n}, const,
                        warps, rows * w // (32 * warps)))
        const = {"N": 2, "B": BLOCK, "LOG2B": 8, "GROUP": GROUP, "BITS": bits, "FMT": 2, "HAS_K": True, "FLAG": False,
                 "RANGE": False}
        if hasattr(K, "tile_config"):
            if hasattr(K, "encode_config"):
                rows, w, warps, one = K.encode_config(T, E, GROUP, BLOCK, 2)
                const["ONE"] = one
            else:
                rows, w, warps = K.tile_config(T, E, GROUP, BLOCK, 2)
            const.update(ROWS=rows, W=w, SPLIT=1, **_cell(K), **_xpose(K, bits), **_asm(K, "asm_enc", bits))
        else:
            rows, w, gw, warps = K.launch_config(T, E, GROUP)
            const.update(ROWS=rows, E_PAD=w, GW=gw)
        out.append((f"reduce-encode {bits}-bit N=2", K.rot_reduce_encode_kernel, {**RED, "payloads": P * 2}, const,
                    warps, rows * w // (32 * warps)))
    return out


def compile_stats(fn, sig, const, warps) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {k: v for k, v in sig.items() if k in fn.arg_names}
    for p in fn.params:  # defaulted parameters (the batched-chunk strides, CHUNKED): the one-message kernel
        if p.name not in sig and p.name not in const and p._param.default is not p._param.empty:
            if p.is_constexpr:
                const = {**const, p.name: p._param.default}
            else:
                sig = {**sig, p.name: "i32"}
    # what the launcher specializes at this shape: 16-byte aligned pointers, sizes divisible by 16 (T aside)
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        t = sig.get(name)
        if isinstance(t, tuple):
            attrs.update({(i, j): [["tt.divisibility", 16]] for j in range(len(t))})
        elif t is not None and name != "T" and (t.startswith("*") or t.startswith("i")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False, "num_warps": warps})
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(k.asm["ptx"])
        info = subprocess.run([str(bindir / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", f"{d}/k.cubin"],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(bindir / "cuobjdump"), "-sass", f"{d}/k.cubin"], capture_output=True, text=True,
                              check=True).stdout
    ins = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+[A-Z@]", ln) and "NOP" not in ln]
    addr = [int(re.match(r"\s+/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in ins]
    loop = 0  # instructions inside backward branches: a run-time loop's body (counted once in "sass")
    for a, ln in zip(addr, ins):
        back = re.search(r"\bBRA\s+0x([0-9a-f]+)", ln)
        if back and int(back.group(1), 16) < a:
            loop += sum(1 for b in addr if int(back.group(1), 16) <= b <= a)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"regs": int(re.search(r"Used (\d+) registers", info).group(1)),
            "stack": int(re.search(r"(\d+) bytes stack frame", info).group(1)),
            "spill": f"{spill.group(1)}/{spill.group(2)}",
            "sass": len(ins), "shfl": sum("SHFL" in ln for ln in ins), "bar": sum("BAR.SYNC" in ln for ln in ins),
            "ldg": sum("LDG" in ln for ln in ins), "loop": loop}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=None, help="git revision of triton_rotation.py to compile (default: working tree)")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    ap.add_argument("--config", default=None, help="JSON overrides of triton_rotation.CONFIG (e.g. "
                    "'{\"cell\": false, \"warps\": 2}')")
    ap.add_argument("--only", default=None, help="only the rows whose label contains this")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    K = load_module(args.rev)
    if args.config:
        import json

        K.CONFIG.update(json.loads(args.config))
    head = (f"`rot_kernel_stats.py{' --rev ' + args.rev if args.rev else ''}"
            f"{' --config ' + repr(args.config) if args.config else ''}` (sm_90a, [{T}, {E}], group {GROUP}, "
            f"Hadamard block {BLOCK}, lg8 scales, k > 0; SASS counts are static, per program, NOPs excluded)\n\n"
            "| kernel | warps | values/thread/tile | registers | stack B | spill st/ld B | SASS instr. | "
            "per value | SHFL | BAR.SYNC | LDG |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for label, fn, sig, const, warps, per_thread in cases(K):
        if args.only and args.only not in label:
            continue
        s = compile_stats(fn, sig, const, warps)
        # a run-time source loop (CONFIG["dec_loop"]) runs its body N - 1 times: count it so per value
        per = (s["sass"] + (const["N"] - 2) * s["loop"]) / per_thread if const.get("LOOP") else s["sass"] / per_thread
        rows.append(f"| {label}{' (loop)' if const.get('LOOP') else ''} | {warps} | {per_thread} | {s['regs']} | "
                    f"{s['stack']} | {s['spill']} | {s['sass']} | {per:.0f} | {s['shfl']} | {s['bar']} | {s['ldg']} |\n")
        print(rows[-1], end="", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(head + "".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
