"""Every Triton kernel compiles for a real GPU target (sm_90, to a cubin with the wheel's ptxas).

The interpreter tests (test_triton_kernels.py) check the numerics but not what only the
GPU compiler refuses (non-constexpr globals, loop variables used as shapes, ...). This
compiles each kernel family in a subprocess without TRITON_INTERPRET, no GPU needed, and
checks the PTX for what would break bitwise equality: approximate division, fused
multiply-add, flush-to-zero arithmetic.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

# Not imported here: this process runs the interpreter tests (TRITON_INTERPRET=1 is read at import).
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (optional: the Triton kernels are skipped)", allow_module_level=True)

P2 = ("*u8", "*u8")
STATIC_SIG = {"src": None, "colmap_ptr": "*i32", "scale_ptr": "*fp32", "inl_ptr": "*i32", "inv_ptr": "*fp32",
              "outl_ptr": "*i32", "head_ptr": "*i16", "body_ptr": "*u8", "flag_ptr": "*i32", "range_ptr": "*i32",
              "T": "i32", "E": "i32", "NK": "i32", "n_body_programs": "i32", "max_in": "fp32"}
STATIC_TILE_SIG = {**{k: v for k, v in STATIC_SIG.items() if k not in ("n_body_programs", "max_in")}, "NB": "i32",
                   "max_in": "fp32"}
STATIC_DEC_SIG = {"payloads": P2, "colmap_ptr": "*i32", "scale_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32",
                  "E": "i32", "NK": "i32"}
STATIC_WIN_ENC_SIG = {"src": None, "inv_ptr": "*fp32", "body_ptr": "*u8", "flag_ptr": "*i32", "range_ptr": "*i32",
                      "T": "i32", "max_in": "fp32"}
STATIC_ROWS_ENC_SIG = {"src": None, "inl_ptr": "*i32", "inv_ptr": "*fp32", "outl_ptr": "*i32", "head_ptr": "*i16",
                       "body_ptr": "*u8", "flag_ptr": "*i32", "range_ptr": "*i32", "T": "i32", "NB": "i32",
                       "max_in": "fp32"}
FEEDBACK_SIG = {"carry_ptr": "*fp32", "next_ptr": "*fp32", "scale_ptr": "*fp32"}
GROUP_FEEDBACK_SIG = {"carry_ptr": "*fp32", "next_ptr": "*fp32"}
STATIC_WIN_DEC_SIG = {"payloads": P2, "scale_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32", "E": "i32"}
STATIC_ROWS_DEC_SIG = {"payloads": P2, "colmap_ptr": "*i32", "scale_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32",
                       "HEADB": "i32"}
GROUP_SIG = {"src": None, "out_ptr": "*u8", "flag_ptr": "*i32", "range_ptr": "*i32", "T": "i32", "E": "i32",
             "EH": "i32", "G": "i32", "NQ": "i32", "max_in": "fp32"}
MX_SIG = {"src": None, "out_ptr": "*u8", "flag_ptr": "*i32", "T": "i32", "E": "i32", "EH": "i32", "G": "i32",
          "NQ": "i32"}
TILE_DEC_SIG = {"payloads": P2, "out_ptr": "*fp32", "T": "i32", "E": "i32", "EH": "i32", "G": "i32", "NQ": "i32"}
ROT_SIG = {"x_ptr": "*fp32", "signs_ptr": "*fp32", "colmap_ptr": "*i32", "bounds_ptr": "*fp32", "lg8_ptr": "*fp32",
           "lg8_asc_ptr": "*fp32", "head_ptr": "*i16", "code_ptr": "*u8", "scale_ptr": "*u8", "flag_ptr": "*i32",
           "range_ptr": "*i32", "T": "i32", "E": "i32", "G": "i32", "NK": "i32", "NCB": "i32", "inv_sqrt_b": "fp32",
           "max_in": "fp32", "rotate_max": "fp32", "scale_max": "fp32"}
ROT_DEC_SIG = {"payloads": P2, "signs_ptr": "*fp32", "colmap_ptr": "*i32", "levels_ptr": "*fp32", "lg8_ptr": "*fp32",
               "out_ptr": "*fp32", "T": "i32", "E": "i32", "G": "i32", "NK": "i32", "NCB": "i32", "CODE_OFF": "i32",
               "SCALE_OFF": "i32", "inv_sqrt_b": "fp32"}
ROT_RED_SIG = {"payloads": P2, "signs_ptr": "*fp32", "dec_colmap_ptr": "*i32", "levels_ptr": "*fp32",
               "lg8_ptr": "*fp32", "CODE_OFF": "i32", "SCALE_OFF": "i32", "enc_colmap_ptr": "*i32",
               "bounds_ptr": "*fp32", "lg8_asc_ptr": "*fp32", "head_ptr": "*i16", "code_ptr": "*u8", "scale_ptr": "*u8",
               "flag_ptr": "*i32", "range_ptr": "*i32", "T": "i32", "E": "i32", "G": "i32", "NK": "i32",
               "NCB": "i32", "inv_sqrt_b": "fp32", "max_in": "fp32", "rotate_max": "fp32", "scale_max": "fp32"}
CELL_SIG = {"cell_lo_ptr": "*i32", "cell_bnd_ptr": "*fp32", "lg8_cnt_ptr": "*i32", "lg8_thr_ptr": "*fp32"}
# (module, kernel, signature, constexprs): small tiles keep the compile quick; the code paths
# (every scale format, 4/6/8-bit packing, Hadamard stages up to 256) are all covered.
CASES = [
    ("triton_static", "static_encode_kernel", {**STATIC_SIG, "src": P2},  # int4 with an odd body row (flat)
     {"N": 2, "BITS": 4, "HAS_K": True, "BLOCK": 256, "FLAG": True, "RANGE": True}),
    ("triton_static", "static_encode_tile_kernel", {**STATIC_TILE_SIG, "src": ("*fp32",)},  # int4-outlier
     {"N": 0, "BITS": 4, "HAS_K": True, "BT": 4, "BC": 512, "FLAG": True, "RANGE": False, "H16": False, "ITERS": 8}),
    ("triton_static", "static_encode_tile_kernel", {**STATIC_TILE_SIG, "src": ("*bf16",)},  # a bf16 partial, int8
     {"N": 0, "BITS": 8, "HAS_K": False, "BT": 2, "BC": 64, "FLAG": False, "RANGE": True, "H16": False, "ITERS": 1}),
    ("triton_static", "static_encode_tile_kernel", {**STATIC_TILE_SIG, "src": ("*fp32",)},  # int4, k = 0
     {"N": 0, "BITS": 4, "HAS_K": False, "BT": 4, "BC": 512, "FLAG": False, "RANGE": False, "H16": False,
      "ITERS": 8}),
    ("triton_static", "static_encode_tile_kernel", {**STATIC_TILE_SIG, "src": P2},  # two-shot's fused reduce + encode
     {"N": 2, "BITS": 4, "HAS_K": True, "BT": 2, "BC": 64, "FLAG": True, "RANGE": True, "H16": True, "ITERS": 2}),
    ("triton_static", "static_decode_sum_tile_kernel", STATIC_DEC_SIG,
     {"N": 2, "BITS": 4, "BT": 4, "BE": 512, "H16": True, "ROW_BYTES": True, "ITERS": 8}),
    ("triton_static", "static_decode_sum_tile_kernel", STATIC_DEC_SIG,  # int4 with an odd body row
     {"N": 2, "BITS": 4, "BT": 1, "BE": 128, "H16": False, "ROW_BYTES": False, "ITERS": 1}),
    ("triton_static", "static_decode_sum_tile_kernel", {**STATIC_DEC_SIG, "payloads": ("*u8",) * 3},
     {"N": 3, "BITS": 8, "BT": 2, "BE": 64, "H16": False, "ROW_BYTES": True, "ITERS": 4}),
    ("triton_group", "group_encode_kernel", {**GROUP_SIG, "src": ("*bf16",)},
     {"N": 0, "BT": 2, "NGT": 4, "GROUP": 32, "FLAG": True, "RANGE": False}),
    ("triton_group", "group_encode_kernel", {**GROUP_SIG, "src": ("*fp32",)},  # the prefill tile of int4-g128
     {"N": 0, "BT": 4, "NGT": 8, "GROUP": 128, "FLAG": False, "RANGE": False}),
    ("triton_group", "group_encode_kernel", {**GROUP_SIG, "src": ("*u8",) * 3},  # two-shot's fused reduce + encode
     {"N": 3, "BT": 4, "NGT": 1, "GROUP": 128, "FLAG": False, "RANGE": True}),
    ("triton_group", "group_decode_sum_tile_kernel", TILE_DEC_SIG, {"N": 2, "GROUP": 32, "BT": 4, "NGT": 32}),
    ("triton_group", "group_decode_sum_kernel",  # odd E
     {"payloads": P2, "out_ptr": "*fp32", "T": "i32", "E": "i32", "G": "i32", "NQ": "i32"},
     {"N": 2, "GROUP": 32, "BLOCK": 256}),
    ("triton_group", "mx_encode_kernel", {**MX_SIG, "src": ("*fp32",)}, {"N": 0, "BT": 2, "NGT": 8, "FLAG": True}),
    ("triton_group", "mx_encode_kernel", {**MX_SIG, "src": P2},  # two-shot's fused reduce + encode
     {"N": 2, "BT": 4, "NGT": 1, "FLAG": False}),
    ("triton_group", "mx_decode_sum_tile_kernel", {**TILE_DEC_SIG, "payloads": ("*u8",) * 3},
     {"N": 3, "BT": 2, "NGT": 4}),
    ("triton_group", "mx_decode_sum_kernel",  # odd E
     {"payloads": P2, "out_ptr": "*fp32", "T": "i32", "E": "i32", "G": "i32", "NQ": "i32"}, {"N": 2, "BLOCK": 256}),
    ("triton_rotation", "rot_encode_kernel", ROT_SIG,
     {"ROWS": 2, "W": 256, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 4, "FMT": 2, "HAS_K": True, "FLAG": True,
      "RANGE": True, "SPLIT": 1}),
    ("triton_rotation", "rot_encode_kernel", ROT_SIG,
     {"ROWS": 2, "W": 128, "B": 32, "LOG2B": 5, "GROUP": 64, "BITS": 6, "FMT": 0, "HAS_K": False, "FLAG": False,
      "RANGE": False, "SPLIT": 3}),
    ("triton_rotation", "rot_encode_kernel", ROT_SIG,
     {"ROWS": 2, "W": 256, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 6, "FMT": 2, "HAS_K": True, "FLAG": False,
      "RANGE": False, "SPLIT": 2}),
    ("triton_rotation", "rot_encode_kernel", ROT_SIG,
     {"ROWS": 2, "W": 64, "B": 64, "LOG2B": 6, "GROUP": 32, "BITS": 8, "FMT": 1, "HAS_K": True, "FLAG": False,
      "RANGE": True, "SPLIT": 1}),
    ("triton_rotation", "rot_reduce_encode_kernel",
     {"payloads": P2, "signs_ptr": "*fp32", "dec_colmap_ptr": "*i32", "levels_ptr": "*fp32", "lg8_ptr": "*fp32",
      "CODE_OFF": "i32", "SCALE_OFF": "i32", "enc_colmap_ptr": "*i32", "bounds_ptr": "*fp32", "lg8_asc_ptr": "*fp32",
      "head_ptr": "*i16", "code_ptr": "*u8", "scale_ptr": "*u8", "flag_ptr": "*i32", "range_ptr": "*i32", "T": "i32",
      "E": "i32", "G": "i32", "NK": "i32", "NCB": "i32", "inv_sqrt_b": "fp32", "max_in": "fp32",
      "rotate_max": "fp32", "scale_max": "fp32"},
     {"N": 2, "ROWS": 2, "W": 128, "B": 128, "LOG2B": 7, "GROUP": 64, "BITS": 4, "FMT": 2, "HAS_K": True,
      "FLAG": True, "RANGE": True, "SPLIT": 1}),
    ("triton_rotation", "rot_decode_sum_kernel", ROT_DEC_SIG,
     {"N": 2, "ROWS": 4, "W": 256, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 6, "FMT": 2, "HAS_K": True,
      "PACKED": True}),
    ("triton_rotation", "rot_decode_sum_kernel", {**ROT_DEC_SIG, "payloads": ("*u8",) * 3},
     {"N": 3, "ROWS": 2, "W": 64, "B": 64, "LOG2B": 6, "GROUP": 32, "BITS": 4, "FMT": 1, "HAS_K": False,
      "PACKED": False}),
    ("triton_rotation", "rot_decode_sum_kernel", ROT_DEC_SIG,
     {"N": 2, "ROWS": 4, "W": 256, "B": 128, "LOG2B": 7, "GROUP": 64, "BITS": 4, "FMT": 2, "HAS_K": True,
      "PACKED": True}),
    ("triton_rotation", "rot_decode_sum_kernel", ROT_DEC_SIG,
     {"N": 2, "ROWS": 1, "W": 128, "B": 8, "LOG2B": 3, "GROUP": 128, "BITS": 3, "FMT": 0, "HAS_K": False,
      "PACKED": False}),
    ("triton_rotation", "rot_decode_sum_kernel", ROT_DEC_SIG,
     {"N": 2, "ROWS": 2, "W": 64, "B": 64, "LOG2B": 6, "GROUP": 64, "BITS": 8, "FMT": 1, "HAS_K": True,
      "PACKED": True}),
    # two-shot's batched chunk launches (CHUNKED: grid axis 2 is the chunk)
    ("triton_group", "group_encode_kernel", {**GROUP_SIG, "src": ("*fp32",)},
     {"N": 0, "BT": 4, "NGT": 8, "GROUP": 128, "FLAG": False, "RANGE": False, "CHUNKED": True}),
    ("triton_group", "group_decode_sum_tile_kernel", {**TILE_DEC_SIG, "payloads": ("*u8",)},
     {"N": 1, "GROUP": 32, "BT": 4, "NGT": 32, "CHUNKED": True}),
    ("triton_group", "mx_encode_kernel", {**MX_SIG, "src": ("*bf16",)},
     {"N": 0, "BT": 2, "NGT": 8, "FLAG": True, "CHUNKED": True}),
    ("triton_group", "mx_decode_sum_tile_kernel", {**TILE_DEC_SIG, "payloads": ("*u8",)},
     {"N": 1, "BT": 2, "NGT": 4, "CHUNKED": True}),
    ("triton_static", "static_encode_tile_kernel", {**STATIC_TILE_SIG, "src": ("*fp32",)},
     {"N": 0, "BITS": 4, "HAS_K": True, "BT": 4, "BC": 512, "FLAG": True, "RANGE": False, "H16": False, "ITERS": 8,
      "CHUNKED": True}),
    # the group encoders' fast path (triton_group.ENCODE_VARIANTS "fast"/"fast4k"): unmasked full
    # tiles, 16-bit scale stores, the fused reduce, a bf16 partial in chunks, both flags
    ("triton_group", "group_encode_kernel", {**GROUP_SIG, "src": ("*fp32",)},
     {"N": 0, "BT": 2, "NGT": 32, "GROUP": 32, "FLAG": False, "RANGE": False, "FAST": True, "EVEN": True,
      "S16": True}),
    ("triton_group", "group_encode_kernel", {**GROUP_SIG, "src": ("*u8",) * 3},
     {"N": 3, "BT": 4, "NGT": 8, "GROUP": 128, "FLAG": True, "RANGE": True, "FAST": True}),
    ("triton_group", "group_encode_kernel", {**GROUP_SIG, "src": ("*bf16",)},
     {"N": 0, "BT": 4, "NGT": 4, "GROUP": 32, "FLAG": True, "RANGE": True, "FAST": True, "S16": True,
      "CHUNKED": True}),
    ("triton_group", "mx_encode_kernel", {**MX_SIG, "src": ("*fp32",)},
     {"N": 0, "BT": 4, "NGT": 32, "FLAG": False, "FAST": True, "EVEN": True}),
    ("triton_group", "mx_encode_kernel", {**MX_SIG, "src": P2},
     {"N": 2, "BT": 2, "NGT": 8, "FLAG": True, "FAST": True}),
    ("triton_static", "static_decode_sum_tile_kernel", {**STATIC_DEC_SIG, "payloads": ("*u8",)},
     {"N": 1, "BITS": 4, "BT": 8, "BE": 256, "H16": True, "ROW_BYTES": True, "ITERS": 4, "CHUNKED": True}),
    ("triton_rotation", "rot_encode_kernel", ROT_SIG,
     {"ROWS": 2, "W": 256, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 4, "FMT": 2, "HAS_K": True, "FLAG": True,
      "RANGE": True, "SPLIT": 1, "CHUNKED": True}),
    # the fast static kernels (issue 8): no bf16 channels (win), bf16 channels (rows)
    ("triton_static", "static_encode_win_kernel", {**STATIC_WIN_ENC_SIG, "src": ("*fp32",)},
     {"E": 8192, "BITS": 4, "BT": 8, "BC": 512, "FLAG": True, "RANGE": True}),
    ("triton_static", "static_encode_win_kernel", {**STATIC_WIN_ENC_SIG, "src": ("*bf16",)},  # odd E, int8
     {"E": 101, "BITS": 8, "BT": 2, "BC": 64, "FLAG": False, "RANGE": False, "CHUNKED": True}),
    ("triton_static", "static_encode_rows_kernel", {**STATIC_ROWS_ENC_SIG, "src": ("*fp32",)},
     {"E": 8192, "NK": 128, "BITS": 4, "BT": 8, "BC": 512, "FLAG": True, "RANGE": True}),
    ("triton_static", "static_encode_rows_kernel", {**STATIC_ROWS_ENC_SIG, "src": ("*bf16",)},
     {"E": 258, "NK": 4, "BITS": 8, "BT": 3, "BC": 64, "FLAG": False, "RANGE": True, "CHUNKED": True}),
    # error feedback fused into the fast encoders (stop 24): carry in, next carry out
    ("triton_static", "static_encode_win_kernel", {**STATIC_WIN_ENC_SIG, **FEEDBACK_SIG, "src": ("*fp32",)},
     {"E": 8192, "BITS": 4, "BT": 8, "BC": 512, "FLAG": True, "RANGE": True, "CARRY": True, "FEEDBACK": True}),
    ("triton_static", "static_encode_rows_kernel", {**STATIC_ROWS_ENC_SIG, **FEEDBACK_SIG, "src": ("*fp32",)},
     {"E": 8192, "NK": 128, "BITS": 4, "BT": 8, "BC": 512, "FLAG": True, "RANGE": True, "CARRY": True,
      "FEEDBACK": True}),
    ("triton_static", "static_encode_win_kernel", {**STATIC_WIN_ENC_SIG, **FEEDBACK_SIG, "src": ("*bf16",)},
     {"E": 4096, "BITS": 8, "BT": 4, "BC": 512, "FLAG": False, "RANGE": True, "FEEDBACK": True}),
    ("triton_static", "static_encode_rows_kernel", {**STATIC_ROWS_ENC_SIG, **FEEDBACK_SIG, "src": ("*bf16",)},
     {"E": 258, "NK": 4, "BITS": 8, "BT": 3, "BC": 64, "FLAG": False, "RANGE": True, "FEEDBACK": True}),
    # error feedback in one kernel for the group codecs and mxfp4 (stop 26): the fast variants on full
    # tiles with a carry, the one code path on ragged ones (a bf16 partial, no carry)
    ("triton_group", "group_encode_kernel", {**GROUP_SIG, **GROUP_FEEDBACK_SIG, "src": ("*fp32",)},
     {"N": 0, "BT": 2, "NGT": 32, "GROUP": 32, "FLAG": True, "RANGE": True, "FAST": True, "EVEN": True,
      "S16": True, "CARRY": True, "FEEDBACK": True}),
    ("triton_group", "group_encode_kernel", {**GROUP_SIG, **GROUP_FEEDBACK_SIG, "src": ("*bf16",)},
     {"N": 0, "BT": 4, "NGT": 8, "GROUP": 128, "FLAG": False, "RANGE": False, "FEEDBACK": True}),
    ("triton_group", "mx_encode_kernel", {**MX_SIG, **GROUP_FEEDBACK_SIG, "src": ("*fp32",)},
     {"N": 0, "BT": 4, "NGT": 32, "FLAG": True, "FAST": True, "EVEN": True, "CARRY": True, "FEEDBACK": True}),
    ("triton_group", "mx_encode_kernel", {**MX_SIG, **GROUP_FEEDBACK_SIG, "src": ("*bf16",)},
     {"N": 0, "BT": 2, "NGT": 8, "FLAG": False, "CARRY": True, "FEEDBACK": True}),
    ("triton_static", "static_decode_sum_win_kernel", STATIC_WIN_DEC_SIG,
     {"N": 2, "BITS": 4, "BT": 8, "BE": 512, "RB": 4096}),
    ("triton_static", "static_decode_sum_win_kernel", {**STATIC_WIN_DEC_SIG, "payloads": ("*u8",)},
     {"N": 1, "BITS": 8, "BT": 2, "BE": 64, "RB": 101, "CHUNKED": True}),
    ("triton_static", "static_decode_sum_rows_kernel", STATIC_ROWS_DEC_SIG,
     {"N": 2, "BITS": 4, "BT": 16, "BE": 256, "H16": True, "E": 8192, "NK": 128, "RB": 4032}),
    ("triton_static", "static_decode_sum_rows_kernel", {**STATIC_ROWS_DEC_SIG, "payloads": ("*u8",) * 3},
     {"N": 3, "BITS": 8, "BT": 3, "BE": 64, "H16": False, "E": 100, "NK": 2, "RB": 98}),
    ("triton_static", "static_decode_sum_rows_kernel", {**STATIC_ROWS_DEC_SIG, "payloads": ("*u8",)},
     {"N": 1, "BITS": 4, "BT": 4, "BE": 128, "H16": True, "E": 128, "NK": 2, "RB": 63, "CHUNKED": True}),
    # stop 22's "src" decode-and-sum variants (sources outside, rows inside; "src-c": column blocks first;
    # without bf16 channels a run-time loop over sources)
    ("triton_static", "static_decode_sum_win_loop_kernel", {**STATIC_WIN_DEC_SIG, "payloads": ("*u8",) * 8},
     {"N": 8, "BITS": 4, "BT": 8, "BE": 512, "RB": 4096}),
    ("triton_static", "static_decode_sum_win_loop_kernel", {**STATIC_WIN_DEC_SIG, "payloads": ("*u8",) * 3},
     {"N": 3, "BITS": 8, "BT": 2, "BE": 64, "RB": 101}),
    ("triton_static", "static_decode_sum_win_loop_kernel", {**STATIC_WIN_DEC_SIG, "payloads": ("*u8",)},
     {"N": 1, "BITS": 4, "BT": 4, "BE": 128, "RB": 64, "CHUNKED": True}),
    ("triton_static", "static_decode_sum_rows_src_kernel", {**STATIC_ROWS_DEC_SIG, "payloads": ("*u8",) * 8},
     {"N": 8, "BITS": 4, "BT": 16, "BE": 128, "H16": True, "E": 8192, "NK": 128, "RB": 4032, "COLS_FIRST": False}),
    ("triton_static", "static_decode_sum_rows_src_kernel", {**STATIC_ROWS_DEC_SIG, "payloads": ("*u8",) * 8},
     {"N": 8, "BITS": 4, "BT": 8, "BE": 128, "H16": True, "E": 8192, "NK": 128, "RB": 4032, "COLS_FIRST": False,
      "ONE16": True}),
    ("triton_static", "static_decode_sum_rows_src_kernel", {**STATIC_ROWS_DEC_SIG, "payloads": ("*u8",) * 2},
     {"N": 2, "BITS": 8, "BT": 3, "BE": 64, "H16": True, "E": 196, "NK": 2, "RB": 194, "COLS_FIRST": True,
      "ONE16": True}),
    ("triton_static", "static_decode_sum_rows_src_kernel", {**STATIC_ROWS_DEC_SIG, "payloads": ("*u8",) * 3},
     {"N": 3, "BITS": 8, "BT": 3, "BE": 64, "H16": False, "E": 100, "NK": 2, "RB": 98, "COLS_FIRST": True}),
    ("triton_static", "static_decode_sum_rows_src_kernel", {**STATIC_ROWS_DEC_SIG, "payloads": ("*u8",)},
     {"N": 1, "BITS": 4, "BT": 4, "BE": 128, "H16": True, "E": 128, "NK": 2, "RB": 63, "COLS_FIRST": True,
      "CHUNKED": True}),
    ("triton_rotation", "rot_decode_sum_kernel", {**ROT_DEC_SIG, "payloads": ("*u8",)},
     {"N": 1, "ROWS": 2, "W": 256, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 6, "FMT": 2, "HAS_K": True,
      "PACKED": True, "CHUNKED": True}),
    # the GPU-only paths of triton_rotation.CONFIG: inline-PTX table reads (ASM: the interpreter
    # runs tl.load instead), the cell level search, the bit-transpose packing, whole-row encoders
    ("triton_rotation", "rot_encode_kernel", {**ROT_SIG, **CELL_SIG},
     {"ROWS": 1, "W": 1024, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 6, "FMT": 2, "HAS_K": True, "FLAG": True,
      "RANGE": True, "SPLIT": 1, "LOG2K": 6, "ASM": True, "XPOSE": True, "ONE": True, "LG8C": True}),
    ("triton_rotation", "rot_encode_kernel", {**ROT_SIG, **CELL_SIG},
     {"ROWS": 2, "W": 256, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 4, "FMT": 2, "HAS_K": True, "FLAG": False,
      "RANGE": False, "SPLIT": 1, "LOG2K": 6, "ASM": True, "CHUNKED": True}),
    ("triton_rotation", "rot_reduce_encode_kernel", {**ROT_RED_SIG, **CELL_SIG},
     {"N": 2, "ROWS": 1, "W": 512, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 6, "FMT": 2, "HAS_K": True,
      "FLAG": True, "RANGE": True, "SPLIT": 1, "LOG2K": 7, "ASM": True, "XPOSE": True, "ONE": True, "LG8C": True}),
    ("triton_rotation", "rot_decode_sum_kernel", ROT_DEC_SIG,
     {"N": 2, "ROWS": 4, "W": 256, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 6, "FMT": 2, "HAS_K": True,
      "PACKED": True, "XPOSE": True, "ASM": True}),
    ("triton_rotation", "rot_decode_sum_kernel", ROT_DEC_SIG,
     {"N": 2, "ROWS": 2, "W": 256, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 4, "FMT": 2, "HAS_K": True,
      "PACKED": True, "ASM": True}),
    # error feedback's next carry (stop 24): one payload decoded into sent - decode
    ("triton_rotation", "rot_decode_sum_kernel", {**ROT_DEC_SIG, "payloads": ("*u8",), "minus_ptr": "*fp32"},
     {"N": 1, "ROWS": 2, "W": 256, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 4, "FMT": 2, "HAS_K": True,
      "PACKED": True, "ASM": True, "MINUS": True}),
    # stop 22: CONFIG["dec_loop"], sources 1..N-1 in a run-time loop
    ("triton_rotation", "rot_decode_sum_kernel", {**ROT_DEC_SIG, "payloads": ("*u8",) * 8},
     {"N": 8, "ROWS": 2, "W": 256, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 4, "FMT": 2, "HAS_K": True,
      "PACKED": True, "ASM": True, "LOOP": True}),
    ("triton_rotation", "rot_decode_sum_kernel", {**ROT_DEC_SIG, "payloads": ("*u8",) * 3},
     {"N": 3, "ROWS": 1, "W": 256, "B": 256, "LOG2B": 8, "GROUP": 64, "BITS": 6, "FMT": 2, "HAS_K": True,
      "PACKED": True, "XPOSE": True, "LOOP": True}),
]


def with_defaults(fn, sig: dict, const: dict) -> tuple[dict, dict]:
    """``sig`` and ``const`` completed with the kernel's defaulted parameters (the batched-chunk
    strides as i32, ``CHUNKED`` at its default, the one-message kernel) unless given."""
    sig, const = dict(sig), dict(const)
    for p in fn.params:
        if p.name in sig or p.name in const or p._param.default is p._param.empty:
            continue
        if p.is_constexpr:
            const[p.name] = p._param.default
        else:
            sig[p.name] = "i32"
    return sig, const


def compile_all() -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bad = re.compile(r"^\s*(?:div\.(?:approx|full)|fma\.|(?:add|sub|mul|div)\.[\w.]*ftz)", re.M)
    for mod, name, sig, const in CASES:
        fn = getattr(importlib.import_module(f"lowbit_tp.kernels.{mod}"), name)
        sig, const = with_defaults(fn, sig, const)
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False, "num_warps": 4})
        found = sorted(set(bad.findall(k.asm["ptx"])))
        assert not found, f"{name} {const}: PTX has {found}"
        assert k.asm["cubin"], name
        print("compiled", name, const, flush=True)


@pytest.mark.slow  # 72 s of one worker in the default suite; CI runs it (make test-slow)
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


if __name__ == "__main__":
    compile_all()


@pytest.mark.slow  # 13 s of ptxas: the slow suite
def test_prefill_tiles_vectorize_without_spills():
    """scripts/ptx_stats.py at a prefill shape (sm_90a, launch-like specialization): no kernel
    spills or uses local memory, the group decoders load their payload bytes and store their
    fp32 sums 16 bytes at a time (the scalar-byte versions ran at 30-40% of a copy on an H100),
    and the encoders read fp32 input 16 bytes at a time."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "ptx_stats.py"), "--tokens", "2048"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| kernel")]
    head = [c.strip() for c in next(ln for ln in r.stdout.splitlines() if ln.startswith("| kernel")).split("|")[1:-1]]
    rows = [dict(zip(head, (c.strip() for c in ln.split("|")[1:-1]))) for ln in lines]
    assert len(rows) == 24, r.stdout
    for row in rows:
        assert row["spill_bytes"] == "0" and row["local"] == "0", row
        if row["kernel"] in ("group_decode_sum_tile_kernel", "mx_decode_sum_tile_kernel",
                             "static_decode_sum_win_kernel", "static_decode_sum_win_loop_kernel"):
            assert int(row["ld_global_v4"]) >= 2 and row["st_global_v4"] == row["st_global"], row
        if row["kernel"] in ("group_encode_kernel", "mx_encode_kernel", "static_encode_win_kernel") or \
                "HAS_K=False" in row["constexprs"]:
            assert int(row["ld_global_v4"]) >= 1, row
        if row["kernel"] in ("static_decode_sum_rows_kernel", "static_decode_sum_rows_src_kernel",
                             "static_encode_rows_kernel"):  # 1-D: no layout
            assert int(row["shared"]) <= 8, row  # conversion (the flag reduction's few accesses at most)


def test_loads_in_flight_reads_the_sass_in_program_order():
    """ptx_stats.loads_in_flight (the static memory-level-parallelism proxy of docs/bench/
    ptx_world8_stop22.md): a use of a load's register (also inside a 128-bit destination) retires
    it and every earlier load, a predicated load counts, and a store's address registers count as
    reads."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("ptx_stats", os.path.join(root, "scripts", "ptx_stats.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sass = "\n".join(f"        /*{16 * i:04x}*/                   {ins} ;" for i, ins in enumerate([
        "LDG.E R2, desc[UR4][R10.64]",
        "LDG.E R3, desc[UR4][R12.64]",
        "LDG.E.128 R4, desc[UR4][R14.64]",
        "FADD R20, R3, R3",  # load 1 used: loads 0 and 1 retire
        "@P0 LDG.E R8, desc[UR4][R16.64]",  # in flight: load 2 and this one
        "FADD R21, R7, RZ",  # R7 is in load 2's 128-bit destination
        "LDG.E.U8 R9, desc[UR4][R18.64]",  # in flight: load 3 and this one
        "STG.E desc[UR4][R8.64], R20",  # the address R8.64 reads R8 and R9: loads 3 and 4 retire
        "LDG.E R11, desc[UR4][R22.64]",  # alone in flight
    ]))
    assert mod.loads_in_flight(sass) == (round((1 + 2 + 3 + 2 + 2 + 1) / 6, 1), 3)
