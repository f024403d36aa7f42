"""Compile-time evidence for the static and group Triton kernels, no GPU needed.

Compiles each kernel for sm_90a with the constexprs its launcher picks for a message shape
(tile sizes from ``tile_config``) and the specialization a real launch gets (16-byte aligned
pointers, integer arguments that are multiples of 16 marked so), runs the wheel's ``ptxas -v``
and ``cuobjdump -sass``, and prints per kernel: registers, spill bytes, 16-byte global
loads/stores against all global loads/stores in the PTX, shared-memory accesses (layout
conversions), SASS instructions per value a thread handles (straight-line code, so a
proxy for the issue cost of one value; the IEEE division's slow path is counted once), and
the global loads a thread has issued and not yet used when each load issues
(``ldg_in_flight_mean`` / ``_max``, :func:`loads_in_flight`: a proxy for memory-level
parallelism). ``loop_sass`` counts the instructions inside backward branches (a run-time
loop's body); the window decode with a run-time source loop (variant "src") reports its
``sass_per_value`` with the body counted once per trip.

    PYTHONPATH=. python3 scripts/ptx_stats.py                        # [8192, 8192], world 2
    PYTHONPATH=. python3 scripts/ptx_stats.py --tokens 2048 --world 8

A proxy for speed, not a measurement: scripts/gpu_check.py measures on a GPU. The group
encoders' ``FAST`` variants hold two paths; ``fast_path_sass_per_value`` counts the kernel
with the old path stubbed out (what a common tile runs, see ``--variant``).
"""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import re
import subprocess
import tempfile


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_stats(mod: str, kernel: str, sig: dict, const: dict, ints: dict, warps: int, values: int) -> dict:
    """ptxas/PTX/SASS numbers of one kernel; ``ints`` are the integer arguments' values (for
    the multiple-of-16 specialization), ``values`` what one thread handles."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"lowbit_tp.kernels.{mod}"), kernel)
    for p in fn.params:  # defaulted parameters (the batched-chunk strides, CHUNKED): the one-message kernel
        if p.name not in sig and p.name not in const and p._param.default is not p._param.empty:
            if p.is_constexpr:
                const = {**const, p.name: p._param.default}
            else:
                sig = {**sig, p.name: "i32"}
    names = fn.arg_names
    attrs = {}
    for k, v in sig.items():
        if isinstance(v, tuple):
            for j in range(len(v)):
                attrs[(names.index(k), j)] = [["tt.divisibility", 16]]
        elif v.startswith("*") or (k in ints and ints[k] % 16 == 0):
            attrs[(names.index(k),)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False, "num_warps": warps})
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        r = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", path, "-o", path + ".cubin"],
                           capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path + ".cubin"], capture_output=True, text=True).stdout
    regs = re.search(r"Used (\d+) registers", r.stderr)
    flight = loads_in_flight(sass)
    lines = re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass, re.M)
    addrs = [int(a, 16) for a, _ in lines]
    loop = 0  # instructions inside backward branches (a run-time loop's body, counted once in n_sass)
    for a, (_, txt) in zip(addrs, lines):
        back = re.search(r"\bBRA\s+0x([0-9a-f]+)", txt)
        if back and int(back.group(1), 16) < a:
            loop += sum(1 for b in addrs if int(back.group(1), 16) <= b <= a)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)]
    count = lambda pat: len(re.findall(pat, ptx))  # noqa: E731
    n_sass = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M))
    shown = " ".join(f"{k}={v}" for k, v in const.items()
                     if k not in ("RANGE", "E") and not (k in ("CHUNKED", "FLAG") and not v))
    return {"kernel": kernel, "constexprs": shown,
            "warps": warps, "registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills),
            "ld_global_v4": count(r"ld\.global[\w.]*\.v4"), "ld_global": count(r"ld\.global"),
            "st_global_v4": count(r"st\.global[\w.]*\.v4"), "st_global": count(r"st\.global"),
            "local": count(r"(?:ld|st)\.local"), "shared": count(r"(?:ld|st)\.shared"),
            "values_per_thread": values, "sass": n_sass, "sass_per_value": round(n_sass / values, 1),
            "ldg_in_flight_mean": flight[0], "ldg_in_flight_max": flight[1], "loop_sass": loop}


def loads_in_flight(sass: str) -> tuple[float, int]:
    """A static proxy for the memory-level parallelism of one thread: walking the SASS in program
    order, the global loads (``LDG``) issued and not yet consumed when each ``LDG`` issues, mean
    and max. A load counts as consumed (with every load issued before it, as if they returned
    in order) at the first later instruction that reads its destination register. Straight-line
    kernels only (no branch is followed); what a warp can keep in flight on the GPU also
    depends on the scoreboard and the memory system, so this is a proxy, not a measurement."""
    pending = {}  # load number -> destination registers
    at_issue = []
    for ins in re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", sass, re.M):
        ins = re.sub(r"^@!?U?P\w+\s+", "", ins.strip())
        op, _, rest = ins.partition(" ")
        ops = [o.strip() for o in rest.split(",")] if rest else []
        reads = ops if op.startswith(("STG", "ST.", "STS", "RED", "ATOM", "BRA", "EXIT", "ISETP", "FSETP")) else ops[1:]
        used = set()
        for o in reads:
            for reg, wide in re.findall(r"\bR(\d+)(\.64|\.128)?", o):
                used |= set(range(int(reg), int(reg) + {".64": 2, ".128": 4}.get(wide, 1)))
        hit = [i for i, regs in pending.items() if regs & used]
        if hit:
            pending = {i: regs for i, regs in pending.items() if i > max(hit)}
        if op.startswith("LDG"):
            d = re.match(r"R(\d+)", ops[0]) if ops else None
            width = 4 if ".128" in op else 2 if ".64" in op else 1
            pending[len(at_issue)] = set(range(int(d.group(1)), int(d.group(1)) + width)) if d else set()
            at_issue.append(len(pending))
    return (round(sum(at_issue) / len(at_issue), 1) if at_issue else 0.0), max(at_issue, default=0)


def _fallback_stubs():
    """jit stubs for the group encoders' old-path helpers (``_group_codes``, ``_mx_codes``), so
    that a compile of a ``FAST`` kernel counts what its common tile runs: the fast path, the
    tile check and the stores (the stubs' zeros fold into a few selects)."""
    import triton
    import triton.language as tl

    @triton.jit
    def group_codes(xl, xh, m, flag_ptr, range_ptr, max_in, BT: tl.constexpr, NGT: tl.constexpr, H: tl.constexpr,
                    FLAG: tl.constexpr, RANGE: tl.constexpr):
        return tl.zeros([BT, NGT, H], tl.uint8), tl.zeros([BT, NGT], tl.int32)

    @triton.jit
    def mx_codes(xl, xh, m, flag_ptr, BT: tl.constexpr, NGT: tl.constexpr, FLAG: tl.constexpr):
        return tl.zeros([BT, NGT, 16], tl.uint8), tl.zeros([BT, NGT], tl.uint8)

    return {"_group_codes": group_codes, "_mx_codes": mx_codes}


def fast_path_stats(mod: str, kernel: str, sig: dict, const: dict, ints: dict, warps: int, values: int) -> dict:
    """:func:`compile_stats` of a ``FAST`` group encoder with its fallback stubbed out."""
    module = importlib.import_module(f"lowbit_tp.kernels.{mod}")
    fn = getattr(module, kernel)
    saved = {name: getattr(module, name) for name in ("_group_codes", "_mx_codes")}
    try:
        for name, stub in _fallback_stubs().items():
            setattr(module, name, stub)
        fn.hash = None  # the kernel's cache key covers the helpers it calls: recompute it
        return compile_stats(mod, kernel, sig, const, ints, warps, values)
    finally:
        for name, f in saved.items():
            setattr(module, name, f)
        fn.hash = None


def cases(t: int, e: int, world: int, k: int, variant: str | None = None):
    """(module, kernel, signature, constexprs, integer args, warps, values a thread) as the launchers pick them;
    ``variant``: the group encoders' (triton_group.ENCODE_VARIANTS; None: the launchers' default)."""
    import triton

    from lowbit_tp.kernels import triton_group as KG
    from lowbit_tp.kernels import triton_static as KS

    pw = ("*u8",) * world
    gsig = {"src": ("*fp32",), "out_ptr": "*u8", "flag_ptr": "*i32", "range_ptr": "*i32", "T": "i32", "E": "i32",
            "EH": "i32", "G": "i32", "NQ": "i32", "max_in": "fp32"}
    dsig = {"payloads": pw, "out_ptr": "*fp32", "T": "i32", "E": "i32", "EH": "i32", "G": "i32", "NQ": "i32"}
    for group in (32, 128):
        ints = {"T": t, "E": e, "EH": e // 2, "G": triton.cdiv(e, group), "NQ": (t * e + 1) // 2}
        bt, ngt, w = KG.tile_config(t, e, group, KG._variant(variant)[0])
        yield ("triton_group", "group_encode_kernel", gsig,
               {"N": 0, "BT": bt, "NGT": ngt, "GROUP": group, "FLAG": False, "RANGE": False,
                **KG._group_consts(variant, t, e, bt, ngt * group, 0)}, ints, w,
               bt * ngt * group // (32 * w))
        bt, ngt, w = KG.tile_config(t, e, group)
        yield ("triton_group", "group_decode_sum_tile_kernel", dsig, {"N": world, "GROUP": group, "BT": bt, "NGT": ngt},
               ints, w, bt * ngt * group // (32 * w))
    ints = {"T": t, "E": e, "EH": e // 2, "G": triton.cdiv(e, 32), "NQ": (t * e + 1) // 2}
    msig = {k: v for k, v in gsig.items() if k not in ("range_ptr", "max_in")}
    mv = KG.MX_ENCODE_VARIANT if variant is None else variant
    bt, ngt, w = KG.tile_config(t, e, 32, KG._variant(mv)[0])
    yield ("triton_group", "mx_encode_kernel", msig,
           {"N": 0, "BT": bt, "NGT": ngt, "FLAG": False, **KG._variant_consts(mv, t, e, bt, ngt * 32, 0)}, ints, w,
           bt * ngt * 32 // (32 * w))
    bt, ngt, w = KG.tile_config(t, e, 32)
    yield ("triton_group", "mx_decode_sum_tile_kernel", dsig, {"N": world, "BT": bt, "NGT": ngt}, ints, w,
           bt * ngt * 32 // (32 * w))
    ssig = {"src": ("*fp32",), "colmap_ptr": "*i32", "scale_ptr": "*fp32", "inl_ptr": "*i32", "inv_ptr": "*fp32",
            "outl_ptr": "*i32", "head_ptr": "*i16", "body_ptr": "*u8", "flag_ptr": "*i32", "range_ptr": "*i32",
            "T": "i32", "E": "i32", "NK": "i32", "NB": "i32", "max_in": "fp32"}
    for bits, nk in ((4, k), (4, 0), (8, 0)):  # int4-outlier, int4, int8
        bt, bc, w = KS.tile_config(t, max(e - nk, nk), 2)
        ints = {"T": t, "E": e, "NK": nk, "NB": triton.cdiv(e - nk, bc)}
        yield ("triton_static", "static_encode_tile_kernel", ssig,
               {"N": 0, "BITS": bits, "HAS_K": nk > 0, "BT": bt, "BC": bc, "FLAG": False, "RANGE": False,
                "H16": False, "ITERS": KS.row_iterations(t, bt)}, ints, w, bt * bc // (32 * w))
    for bits, nk in ((4, k), (8, 0)):
        bt, be, w = KS.tile_config(t, e, world)
        yield ("triton_static", "static_decode_sum_tile_kernel",
               {"payloads": pw, "colmap_ptr": "*i32", "scale_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32", "E": "i32",
                "NK": "i32"},
               {"N": world, "BITS": bits, "BT": bt, "BE": be, "H16": True, "ROW_BYTES": True,
                "ITERS": KS.row_iterations(t, bt)},
               {"T": t, "E": e, "NK": nk}, w, bt * be // (32 * w))
    # the fast kernels (issue 8): FLAG as a CUDA-graph step (nonfinite="flag") compiles them
    esig = {"src": ("*fp32",), "inl_ptr": "*i32", "inv_ptr": "*fp32", "outl_ptr": "*i32", "head_ptr": "*i16",
            "body_ptr": "*u8", "flag_ptr": "*i32", "range_ptr": "*i32", "T": "i32", "NB": "i32", "max_in": "fp32"}
    wsig = {k2: v for k2, v in esig.items() if k2 in ("src", "inv_ptr", "body_ptr", "flag_ptr", "range_ptr", "T",
                                                       "max_in")}
    for flag in (False, True):
        bt, bc = KS.FAST_TILES[KS.AUTO]["enc_rows"]
        bt = KS._fast_rows(bt, t)
        yield ("triton_static", "static_encode_rows_kernel", esig,
               {"E": e, "NK": k, "BITS": 4, "BT": bt, "BC": bc, "FLAG": flag, "RANGE": False},
               {"T": t, "NB": triton.cdiv(e - k, bc)}, 4, bt * bc // 128)
        bt, bc = KS.FAST_TILES[KS.AUTO]["enc_win"]
        for bits in (4, 8):
            yield ("triton_static", "static_encode_win_kernel", wsig,
                   {"E": e, "BITS": bits, "BT": bt, "BC": bc, "FLAG": flag, "RANGE": False}, {"T": t}, 4,
                   bt * bc // 128)
    for kernel, variant in (("static_decode_sum_win_kernel", "auto"), ("static_decode_sum_win_loop_kernel", "src")):
        for bits in (4, 8):
            bt, be, w = KS.win_tile_config(t, e, world, variant)
            yield ("triton_static", kernel,
                   {"payloads": pw, "scale_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32", "E": "i32"},
                   {"N": world, "BITS": bits, "BT": bt, "BE": be, "RB": e // 2 if bits == 4 else e}, {"T": t, "E": e},
                   w, bt * be // (32 * w))
    rsig = {"payloads": pw, "colmap_ptr": "*i32", "scale_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32",
            "HEADB": "i32"}
    bt, be, w = KS.rows_tile_config(t, e, world)
    yield ("triton_static", "static_decode_sum_rows_kernel", rsig,
           {"N": world, "BITS": 4, "BT": bt, "BE": be, "H16": True, "E": e, "NK": k, "RB": (e - k) // 2},
           {"T": t, "HEADB": 2 * t * k}, w, bt * be // (32 * w))
    # stop 22's decode-and-sum variants "src" (sources outside, rows inside, one 16-bit load a value
    # where the body row is an even number of bytes) and "src-2" (two loads a value); off by default
    for variant in ("src", "src-2"):
        bt, be, w = KS.rows_tile_config(t, e, world, variant)
        yield ("triton_static", "static_decode_sum_rows_src_kernel", rsig,
               {"N": world, "BITS": 4, "BT": bt, "BE": be, "H16": True, "E": e, "NK": k, "RB": (e - k) // 2,
                "COLS_FIRST": False, "ONE16": variant == "src" and (e - k) // 2 % 2 == 0},
               {"T": t, "HEADB": 2 * t * k}, w, bt * be // (32 * w))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--world", type=int, default=2, help="payloads per decode-and-sum")
    ap.add_argument("--k", type=int, default=None, help="int4-outlier's kept channels (default hidden // 64)")
    ap.add_argument("--only", default=None, help="comma-separated substrings of the kernel names to compile")
    ap.add_argument("--variant", default=None,
                    help="group encoder variant (default: the launchers' ENCODE_VARIANT, MX_ENCODE_VARIANT)")
    ap.add_argument("--json", default=None, help="also write the rows (and the Triton version) to this JSON file")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    k = args.hidden // 64 if args.k is None else args.k
    only = args.only.split(",") if args.only else None
    rows = []
    for c in cases(args.tokens, args.hidden, args.world, k, args.variant):
        if only is not None and not any(o in c[1] for o in only):
            continue
        row = compile_stats(*c)
        row["fast_path_sass_per_value"] = fast_path_stats(*c)["sass_per_value"] if c[3].get("FAST") else "-"
        if c[1] == "static_decode_sum_win_loop_kernel":  # its source loop runs N - 1 times, counted once
            row["sass_per_value"] = round((row["sass"] + (c[3]["N"] - 2) * row["loop_sass"]) / c[6], 1)
        rows.append(row)
    cols = list(rows[0])
    print(f"sm_90a, [{args.tokens}, {args.hidden}], world {args.world}, k {k}; "
          f"`PYTHONPATH=. python3 scripts/ptx_stats.py --tokens {args.tokens} --hidden {args.hidden} "
          f"--world {args.world}" + (f" --variant {args.variant}" if args.variant else "") + "`\n")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        from pathlib import Path

        import triton

        from lowbit_tp.results import json_text

        Path(args.json).write_text(json_text({"triton": triton.__version__, "tokens": args.tokens,
                                              "hidden": args.hidden, "world": args.world, "k": k, "rows": rows},
                                             indent=1))


if __name__ == "__main__":
    main()
