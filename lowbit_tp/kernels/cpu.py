"""Compiled CPU kernels (``cpu_kernels.cpp``), built once per machine and loaded with ctypes.

Why a small C++ file and ctypes: the kernels need exact control over fp32 operation order,
rounding and bf16/fp16 conversion to match the eager reference bit for bit, and must run
at memory speed on one core. Plain C++ with no torch headers builds in about a second with
the system compiler, has no ABI tie to a torch version, and adds no Python dependency.

The library is built by ``scripts/setup.sh`` (``python -m lowbit_tp.kernels.cpu``) or on
first use, into a cache folder keyed by the source, the flags and the CPU, and loaded
lazily. If the compiler is missing or the build fails, :func:`available` is False and
every codec stays on the reference path (``backend="auto"``); :func:`build_error` says why.
With ``-march=native`` the hot loops use hand-written AVX2 (and AVX-512) paths;
``LOWBIT_TP_CPU_PORTABLE=1`` builds the scalar twins instead (what a CPU without AVX2 runs) and
``LOWBIT_TP_CPU_NO_AVX512=1`` the AVX2 paths without AVX-512 (the tests compare all three).

Wrappers take and return tensors; each codec's dispatch (in ``lowbit_tp/codecs``) calls them.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# -ffp-contract=off: no fused multiply-add, so products round as the reference's do.
# -fno-trapping-math only drops FP-exception side effects (lets float selects vectorize);
# values are unchanged. Never -ffast-math.
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-fno-strict-aliasing")
_ARCH_FLAGS = ("-march=native",)
_PORTABLE_FLAGS = ("-DLBT_PORTABLE",)
_NO_AVX512_FLAGS = ("-mno-avx512f",)


def _arch_variants() -> tuple[tuple[str, ...], ...]:
    """Flag sets to try in order: this CPU's vector units, then a portable build."""
    if os.environ.get("LOWBIT_TP_CPU_PORTABLE", "0") == "1":
        return (_PORTABLE_FLAGS,)
    if os.environ.get("LOWBIT_TP_CPU_NO_AVX512", "0") == "1":
        return (_ARCH_FLAGS + _NO_AVX512_FLAGS, ())
    return (_ARCH_FLAGS, ())
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ERROR: list[str] = []


def _cpu_id() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_TP_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lowbit-tp", "kernels")
    return Path(root)


def library_path() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, _arch_variants(), _cpu_id())).encode()).hexdigest()[:16]
    return cache_dir() / f"lowbit_cpu_{key}.so"


def build(*, verbose: bool = False) -> Path:
    """Compile the kernels (if not already built for this source and CPU); returns the library path.

    Tries ``-march=native`` first (vector units of this CPU), then a portable build. Writes
    to a temporary name and renames, so concurrent ranks never load a half-written file.
    """
    out = library_path()
    if out.exists():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (g++/c++/clang++)")
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in _arch_variants():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cxx, *FLAGS, *arch, str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, out)
            if verbose:
                print(" ".join(cmd))
            return out
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}\n{proc.stderr.strip()}")
    raise RuntimeError("building the CPU kernels failed:\n" + "\n".join(errors))


@functools.lru_cache(maxsize=None)
def _lib():
    path = build()
    lib = ctypes.CDLL(str(path))
    if lib.lbt_abi_version() != 6:
        raise RuntimeError(f"{path}: unexpected ABI version")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lbt_static_encode.argtypes = [p, i32, i64, i64, i64, p, i64, p, i32, p, p]
    lib.lbt_static_encode.restype = i32
    lib.lbt_static_encode_feedback.argtypes = [p, i32, p, i64, i64, i64, p, i64, p, p, i32, p, p, p]
    lib.lbt_static_encode_feedback.restype = i32
    lib.lbt_static_decode_sum.argtypes = [p, p, i32, i64, i64, p, i64, i32, p, i32]
    lib.lbt_static_decode_sum.restype = None
    lib.lbt_group_encode.argtypes = [p, i32, i64, i64, i64, i64, p, p]
    lib.lbt_group_encode.restype = i32
    lib.lbt_group_decode_sum.argtypes = [p, i32, i64, i64, i64, p, i32]
    lib.lbt_group_decode_sum.restype = None
    f32 = ctypes.c_float
    lib.lbt_rot_encode.argtypes = [p, i32, i64, i64, p, p, f32, p, i32, f32, f32, p, p]
    lib.lbt_rot_encode.restype = i32
    lib.lbt_rot_decode_sum.argtypes = [p, i32, i64, p, p, f32, p, p, i32]
    lib.lbt_rot_decode_sum.restype = None
    lib.lbt_group_decode_error.argtypes = [p, i64, i64, i64, p, p]
    lib.lbt_group_decode_error.restype = None
    lib.lbt_rot_decode_error.argtypes = [p, i64, p, p, f32, p, p, p]
    lib.lbt_rot_decode_error.restype = None
    lib.lbt_rot_codes.argtypes = [p, i64, f32, i32, p, i32, p]
    lib.lbt_rot_codes.restype = None
    lib.lbt_lg8_codes.argtypes = [p, i64, f32, p, p, p]
    lib.lbt_lg8_codes.restype = None
    lib.lbt_ecsq_pack.argtypes = [p, i64, i64, p, p, i64, i64, p]
    lib.lbt_ecsq_pack.restype = i64
    lib.lbt_ecsq_unpack.argtypes = [p, i64, i64, i64, p, p, i32, i64, p]
    lib.lbt_ecsq_unpack.restype = i64
    lib.lbt_ecsq_steps.argtypes = [p, i64, i64, p, i64, p, i64, i64, f32, i32, p, p]
    lib.lbt_ecsq_steps.restype = None
    lib.lbt_ecsq_rotate.argtypes = [p, i64, i64, p, i32, i64, f32, p]
    lib.lbt_ecsq_rotate.restype = None
    return lib


def available() -> bool:
    """Whether the kernels are built (or build now) and load; False means: use the reference."""
    if os.environ.get("LOWBIT_TP_CPU_KERNELS", "1") == "0":
        _ERROR[:] = ["disabled by LOWBIT_TP_CPU_KERNELS=0"]
        return False
    try:
        _lib()
    except Exception as exc:  # no compiler, failed build, unloadable library
        _ERROR[:] = [str(exc)]
        return False
    return True


def features() -> set[str]:
    """The vector paths the loaded build has: subsets of {"avx2", "avx512", "gfni"}."""
    f = _lib().lbt_features()
    return {name for bit, name in ((1, "avx2"), (2, "avx512"), (4, "gfni")) if f & bit}


def build_error() -> str | None:
    """Why :func:`available` returned False (None if it did not)."""
    return _ERROR[0] if _ERROR else None


# --------------------------------------------------------------------------- wrappers
def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``x`` with unit inner stride, its dtype code and its row stride in elements."""
    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    return x, _DTYPES[x.dtype], (x.stride(0) if x.shape[0] > 1 else x.shape[1])


def _ptrs(ts: Sequence[torch.Tensor]):
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])


class Scan(NamedTuple):
    """What an encoder saw of its input in the same pass: whether it held NaN/Inf, and the
    largest magnitude among the finite values (the codec's range check, without a second pass)."""
    nonfinite: bool
    amax: float


def _payload_out(out: torch.Tensor | None, nbytes: int) -> torch.Tensor:
    """``out`` (checked: the kernels write ``nbytes`` bytes through its pointer) or a new buffer."""
    if out is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    if out.dtype != torch.uint8 or out.numel() != nbytes or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"payload buffer must be a contiguous CPU uint8 tensor of {nbytes} bytes, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def _sum_out(out: torch.Tensor | None, shape: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """The decoded sum's buffer (fp32 unless ``out`` says bf16/fp16) and its dtype code."""
    if out is None:
        return torch.empty(shape, dtype=torch.float32), 0
    if (out.dtype not in _DTYPES or tuple(out.shape) != tuple(shape) or not out.is_contiguous()
            or out.device.type != "cpu"):
        raise ValueError(f"sum buffer must be a contiguous CPU fp32/bf16/fp16 tensor of shape {tuple(shape)}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out, _DTYPES[out.dtype]


def static_encode(x: torch.Tensor, *, outliers: torch.Tensor, inv_scale: torch.Tensor, bits: int,
                  nbytes: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, Scan]:
    """Static int4/int8 payload (kept channels as bf16 first) and the input :class:`Scan`;
    written into ``out`` when given (``nbytes`` contiguous uint8)."""
    x, dt, ld = _rows(x)
    t, e = x.shape
    out = _payload_out(out, nbytes)
    amax = ctypes.c_float()
    bad = _lib().lbt_static_encode(x.data_ptr(), dt, t, e, ld, outliers.data_ptr(), outliers.numel(),
                                   inv_scale.data_ptr(), bits, out.data_ptr(), ctypes.byref(amax))
    return out, Scan(bool(bad), amax.value)


def static_encode_feedback(x: torch.Tensor, carry: torch.Tensor | None, *, outliers: torch.Tensor,
                           inv_scale: torch.Tensor, scale: torch.Tensor, bits: int, nbytes: int,
                           out: torch.Tensor | None = None, next_out: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, Scan]:
    """:func:`static_encode` of ``x + carry`` (fp32; ``carry`` a contiguous fp32 ``x``-shaped
    tensor, or None for ``x`` itself, then fp32) and error feedback's next carry, ``sent -
    decode(payload)`` fp32 with +0.0 where not finite (``scale``: the inliers' fp32 scales, as
    the decoder's; into ``next_out`` when given), in one pass over the rows; and the sent
    values' :class:`Scan`."""
    x, dt, ld = _rows(x)
    t, e = x.shape
    out = _payload_out(out, nbytes)
    nxt = _next_out(next_out, (t, e))
    amax = ctypes.c_float()
    bad = _lib().lbt_static_encode_feedback(x.data_ptr(), dt, None if carry is None else carry.data_ptr(), t, e, ld,
                                            outliers.data_ptr(), outliers.numel(), inv_scale.data_ptr(),
                                            scale.data_ptr(), bits, out.data_ptr(), nxt.data_ptr(),
                                            ctypes.byref(amax))
    return out, nxt, Scan(bool(bad), amax.value)


def static_decode_sum(payloads: Sequence[torch.Tensor], shape: tuple[int, int], *, scales: Sequence[torch.Tensor],
                      outliers: Sequence[torch.Tensor], bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 sum in rank order; with ``out`` (fp32, bf16 or fp16 ``shape``) written there,
    rounded once to its dtype (bitwise ``sum.to(out.dtype)``)."""
    t, e = shape
    k = outliers[0].numel()
    out, odt = _sum_out(out, shape)
    payloads = [p.contiguous() for p in payloads]
    _lib().lbt_static_decode_sum(_ptrs(payloads), _ptrs(scales), len(payloads), t, e, _ptrs(outliers), k, bits,
                                 out.data_ptr(), odt)
    return out


def group_encode(x: torch.Tensor, *, group: int, nbytes: int,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, Scan]:
    """int4 with fp16 group scales, and the input :class:`Scan`."""
    x, dt, ld = _rows(x)
    t, e = x.shape
    out = _payload_out(out, nbytes)
    amax = ctypes.c_float()
    bad = _lib().lbt_group_encode(x.data_ptr(), dt, t, e, ld, group, out.data_ptr(), ctypes.byref(amax))
    return out, Scan(bool(bad), amax.value)


def group_decode_sum(payloads: Sequence[torch.Tensor], shape: tuple[int, int], *, group: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    t, e = shape
    out, odt = _sum_out(out, shape)
    payloads = [p.contiguous() for p in payloads]
    _lib().lbt_group_decode_sum(_ptrs(payloads), len(payloads), t, e, group, out.data_ptr(), odt)
    return out


ROT_SCALE_FORMATS = {"fp16": 0, "e8m0": 1, "lg8": 2}


def rot_spec(*, e: int, k: int, group: int, block: int, bits: int, scale_format: str) -> torch.Tensor:
    """The int64 description of a rotated codec that the rot kernels take."""
    return torch.tensor([e, k, group, block, bits, ROT_SCALE_FORMATS[scale_format]], dtype=torch.int64)


def rot_encode(x: torch.Tensor, *, outliers: torch.Tensor, spec: torch.Tensor, inv_sqrt_block: float,
               tables: Sequence[torch.Tensor], propagate: bool, rotate_max: float, scale_max: float,
               nbytes: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int, Scan]:
    """Rotated-codec payload; returns (payload, status, scan): status bit 0 = the input held
    NaN/Inf, bit 1 = a rotated value overflowed or a group absmax exceeded ``scale_max`` (clamped)."""
    x, dt, ld = _rows(x)
    out = _payload_out(out, nbytes)
    amax = ctypes.c_float()
    status = _lib().lbt_rot_encode(x.data_ptr(), dt, x.shape[0], ld, outliers.data_ptr(), spec.data_ptr(),
                                   inv_sqrt_block, _ptrs(tables), int(propagate), rotate_max, scale_max,
                                   out.data_ptr(), ctypes.byref(amax))
    return out, int(status), Scan(bool(status & 1), amax.value)


def rot_decode_sum(payloads: Sequence[torch.Tensor], shape: tuple[int, int], *, outliers: Sequence[torch.Tensor],
                   spec: torch.Tensor, inv_sqrt_block: float, tables: Sequence[torch.Tensor],
                   out: torch.Tensor | None = None) -> torch.Tensor:
    t, e = shape
    out, odt = _sum_out(out, shape)
    payloads = [p.contiguous() for p in payloads]
    _lib().lbt_rot_decode_sum(_ptrs(payloads), len(payloads), t, _ptrs(outliers), spec.data_ptr(),
                              inv_sqrt_block, _ptrs(tables), out.data_ptr(), odt)
    return out


def _sent_and_next(sent: torch.Tensor, shape: tuple[int, int],
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    sent = sent.float().contiguous()
    if tuple(sent.shape) != tuple(shape):
        raise ValueError(f"sent values of shape {tuple(sent.shape)} for a payload of shape {tuple(shape)}")
    return sent, _next_out(out, shape)


def _next_out(out: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """Error feedback's next carry: ``out`` (the codec checked it: contiguous fp32 ``shape``) or a new one."""
    return torch.empty(shape, dtype=torch.float32) if out is None else out


def group_decode_error(payload: torch.Tensor, shape: tuple[int, int], sent: torch.Tensor, *,
                       group: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Error feedback's next carry ``sent - decode(payload)`` (fp32, +0.0 where not finite) in
    one pass: the decode of :func:`group_decode_sum` of one payload, differenced row by row
    (into ``out`` when given)."""
    sent, nxt = _sent_and_next(sent, shape, out)
    payload = payload.contiguous()  # (kept alive across the call)
    _lib().lbt_group_decode_error(payload.data_ptr(), shape[0], shape[1], group, sent.data_ptr(),
                                  nxt.data_ptr())
    return nxt


def rot_decode_error(payload: torch.Tensor, shape: tuple[int, int], sent: torch.Tensor, *, outliers: torch.Tensor,
                     spec: torch.Tensor, inv_sqrt_block: float, tables: Sequence[torch.Tensor],
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`group_decode_error` of the ``rot-*`` codecs (:func:`rot_decode_sum`'s decode)."""
    sent, nxt = _sent_and_next(sent, shape, out)
    payload = payload.contiguous()  # (kept alive across the call)
    _lib().lbt_rot_decode_error(payload.data_ptr(), shape[0], outliers.data_ptr(), spec.data_ptr(),
                                inv_sqrt_block, _ptrs(tables), sent.data_ptr(), nxt.data_ptr())
    return nxt


def rot_codes(z: torch.Tensor, scale: float, *, bounds: torch.Tensor, bits: int, finite: bool = True) -> torch.Tensor:
    """Test hook: the level codes the rot encoders give the rotated values ``z`` (fp32, one
    group) under ``scale``; the reference's are ``torch.bucketize(clamp(z / scale, -1, 1), bounds)``.
    ``finite`` says the group holds no NaN/Inf (the encoders know it from their absmax pass)."""
    z = z.float().contiguous()
    bounds = bounds.float().contiguous()
    out = torch.empty(z.numel(), dtype=torch.uint8)
    _lib().lbt_rot_codes(z.data_ptr(), z.numel(), scale, int(finite), bounds.data_ptr(), bits, out.data_ptr())
    return out


def lg8_codes(amax: torch.Tensor, base: float, *, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Test hook: the lg8 codes and scales the rot encoders give the group absmaxes ``amax``
    (fp32, finite, <= ``base``) under the token's bf16 base ``base`` (as fp32); the reference's
    are in ``lowbit_tp.codecs.rotation._lg8_encode``."""
    amax = amax.float().contiguous()
    table = table.float().contiguous()
    scale = torch.empty(amax.numel(), dtype=torch.float32)
    q = torch.empty(amax.numel(), dtype=torch.uint8)
    _lib().lbt_lg8_codes(amax.data_ptr(), amax.numel(), base, table.data_ptr(), scale.data_ptr(), q.data_ptr())
    return q, scale


def _code_lengths(lengths: torch.Tensor, half: int) -> torch.Tensor:
    """A prefix code's lengths for ``q = -half..half`` as contiguous int64 (checked: the
    kernels index them by ``q + half``)."""
    if lengths.numel() != 2 * half + 1:
        raise ValueError(f"an ECSQ code has {2 * half + 1} lengths for q in [-{half}, {half}], got {lengths.numel()}")
    return lengths.to(torch.int64).contiguous()


def ecsq_pack(q: torch.Tensor, *, lengths: torch.Tensor, codes: torch.Tensor, half: int, nbytes: int) -> torch.Tensor:
    """The ECSQ slots ``[T, nbytes]`` uint8 of the codes ``q [T, E]`` (in ``[-half, half]``):
    bitwise ``lowbit_tp.codecs.ecsq.pack_rows``, with its ValueError for a row that does not
    fit; a code outside ``[-half, half]`` is a ValueError too (the reference does not check)."""
    q = q.to(torch.int64).contiguous()
    lengths = _code_lengths(lengths, half)
    codes = codes.to(torch.int64).contiguous()
    if codes.numel() != lengths.numel():
        raise ValueError(f"an ECSQ code has {lengths.numel()} codewords, got {codes.numel()}")
    t, e = q.shape
    out = torch.empty(t, nbytes, dtype=torch.uint8)
    if t == 0:
        return out
    bad = _lib().lbt_ecsq_pack(q.data_ptr(), t, e, lengths.data_ptr(), codes.data_ptr(), half, nbytes, out.data_ptr())
    if bad <= -2:
        raise ValueError(f"ECSQ row {-2 - bad} has a code outside [-{half}, {half}]")
    if bad >= 0:
        row = q[bad]
        if bool((row.abs() > half).any()):
            raise ValueError(f"ECSQ row {bad} has a code outside [-{half}, {half}]")
        need = int(lengths[row + half].sum())
        raise ValueError(f"a row's codewords need {need} bits, more than its {8 * nbytes}")
    return out


def ecsq_rotate(x: torch.Tensor, *, signs: torch.Tensor, block: int, encode: bool) -> torch.Tensor:
    """The ECSQ codec's rotation of fp32 rows ``x [T, E]``, bitwise the reference's:
    ``F.fwht(x * signs, block)`` (``encode``) or ``F.fwht(x, block) * signs``."""
    x = x.float().contiguous()
    signs = signs.float().contiguous()
    t, e = x.shape
    if e % block or signs.numel() != e:
        raise ValueError(f"rows of {e} values need {e} signs and a block dividing {e}")
    out = torch.empty(t, e, dtype=torch.float32)
    if t and e:
        _lib().lbt_ecsq_rotate(x.data_ptr(), t, e, signs.data_ptr(), int(encode), block,
                               1.0 / math.sqrt(block), out.data_ptr())
    return out


def ecsq_steps(z: torch.Tensor, *, table: torch.Tensor, lengths: torch.Tensor, budget_bits: int, half: int,
               offset: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """ECSQ rate control of the finite fp32 rows ``z [T, E]``: bitwise
    ``lowbit_tp.codecs.ecsq.choose_steps`` (``table``: its candidate step factors, fp32),
    returning ``(d [T] fp32, q [T, E] int64)``."""
    z = z.float().contiguous()
    table = table.float().contiguous()
    lengths = _code_lengths(lengths, half)
    t, e = z.shape
    d = torch.empty(t, dtype=torch.float32)
    q = torch.empty(t, e, dtype=torch.int64)
    if t:
        _lib().lbt_ecsq_steps(z.data_ptr(), t, e, table.data_ptr(), table.numel(), lengths.data_ptr(), half,
                              budget_bits, offset, int(offset == 0.5), d.data_ptr(), q.data_ptr())
    return d, q


def ecsq_unpack(slots: torch.Tensor, e: int, *, symbols: torch.Tensor, lengths: torch.Tensor,
                half: int) -> torch.Tensor:
    """The ``e`` codes (int32) of each ECSQ slot of ``slots [T, C]`` uint8: bitwise
    ``lowbit_tp.codecs.ecsq.unpack_rows`` (``symbols``/``lengths``: its decode table of
    ``2**width`` windows), with its ValueError for a corrupt payload."""
    if slots.dtype != torch.uint8 or slots.dim() != 2:
        raise ValueError(f"ECSQ slots are a [T, C] uint8 tensor, got {slots.dtype} {tuple(slots.shape)}")
    slots = slots.contiguous()
    symbols = symbols.to(torch.int32).contiguous()
    lengths = lengths.to(torch.int32).contiguous()
    width = symbols.numel().bit_length() - 1
    if symbols.numel() != 1 << width or lengths.numel() != symbols.numel() or width > 32:
        raise ValueError("an ECSQ decode table has 2**width entries (width <= 32)")
    t, c = slots.shape
    out = torch.empty(t, e, dtype=torch.int32)
    if t == 0 or e == 0:
        return out.zero_()
    bad = _lib().lbt_ecsq_unpack(slots.data_ptr(), t, c, e, symbols.data_ptr(), lengths.data_ptr(), width, half,
                                 out.data_ptr())
    if bad >= 0:
        raise ValueError("corrupt ECSQ payload: a row's codewords run past its slot")
    return out


if __name__ == "__main__":  # scripts/setup.sh: build now, report, never fail the set-up
    try:
        print(f"lowbit-tp CPU kernels: {build(verbose='-v' in sys.argv)}")
    except Exception as exc:
        print(f"lowbit-tp CPU kernels not built (the reference path will be used): {exc}", file=sys.stderr)
