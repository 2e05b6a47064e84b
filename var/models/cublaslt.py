"""Two cuBLASLt matmuls with epilogues torch does not expose, for the feed-forward's fc1 -> GELU -> fc2:

- ``linear_gelu_aux(x, w, b)``: act = gelu_tanh(x @ w^T + b) from the fp32 accumulator, and the pre-activation
  written beside it (epilogue GELU_AUX_BIAS) for the backward: no GELU pass reading the pre-activation back.
- ``matmul_dgelu(g, w, pre)``: (g @ w) * gelu_tanh'(pre), and its column sums (epilogue DGELU[_BGRAD]): fc2's
  input gradient with GELU's derivative applied, and fc1's bias gradient, in fc2's backward GEMM.

This is what the GEMMs of a training step run (bench/results note 61); autocast's path writes the
pre-activation, reads it back for GELU, and in the backward reads it and the activation's gradient again.
Bindings through ctypes on the libcublasLt that torch has loaded, row-major torch tensors mapped onto
cuBLAS's column-major convention (y^T = w x^T). bf16/fp16 on CUDA only: ``supported()`` says when.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

# cuBLAS enums (cublasLt.h, cublas_api.h, library_types.h).
_DTYPES = {torch.bfloat16: 14, torch.float16: 2}  # CUDA_R_16BF, CUDA_R_16F
_R32F, _COMPUTE_32F = 0, 68
_OP_N, _OP_T = 0, 1
_GELU_AUX_BIAS, _DGELU, _DGELU_BGRAD = 164, 192, 208
_TRANSA, _TRANSB, _EPILOGUE, _BIAS_POINTER, _AUX_POINTER, _AUX_LD = 3, 4, 7, 8, 11, 12
_PREF_MAX_WORKSPACE = 1
WORKSPACE_BYTES = 32 << 20  # what cuBLAS recommends on Hopper
CANDIDATES = 8  # algorithms of the heuristic timed once per GEMM shape


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


@functools.cache
def _library() -> ctypes.CDLL:
    """The libcublasLt torch linked (found in this process's mappings), else the first one the loader finds."""
    torch.cuda.init()
    with open("/proc/self/maps") as f:
        paths = sorted({ln.split()[-1] for ln in f if "libcublasLt.so" in ln})
    for name in paths + ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise RuntimeError("cuBLASLt: no libcublasLt shared library is loaded or loadable")
    for fn in ("cublasLtCreate", "cublasLtMatmulDescCreate", "cublasLtMatmulDescSetAttribute",
               "cublasLtMatrixLayoutCreate", "cublasLtMatmulPreferenceCreate", "cublasLtMatmulPreferenceSetAttribute",
               "cublasLtMatmulPreferenceDestroy",
               "cublasLtMatmulAlgoGetHeuristic", "cublasLtMatmul"):
        getattr(lib, fn).restype = ctypes.c_int
    lib.cublasLtMatrixLayoutCreate.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                                               ctypes.c_int64]
    lib.cublasLtMatmulDescSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                                         ctypes.c_size_t]
    lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int, ctypes.c_void_p,
                                                                           ctypes.c_void_p]
    lib.cublasLtMatmul.argtypes = [ctypes.c_void_p] * 14 + [ctypes.c_size_t, ctypes.c_void_p]
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


def _set(setter, obj, attr: int, value) -> None:
    _check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"setting attribute {attr}")


class _Plan:
    """One GEMM shape, epilogue and operand alignment: its descriptors, made once, and its algorithm, chosen on
    the first call."""

    def __init__(self, handle, dtype: int, epilogue: int, transa: int, m: int, n: int, k: int, lda: int, ldb: int):
        lib = _library()
        self.handle, self.desc = handle, ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R32F), "MatmulDescCreate")
        _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _TRANSA, ctypes.c_int32(transa))
        _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _TRANSB, ctypes.c_int32(_OP_N))
        _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _EPILOGUE, ctypes.c_uint32(epilogue))
        _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _AUX_LD, ctypes.c_int64(m))
        self.layouts = [ctypes.c_void_p() for _ in range(3)]
        a_rows, a_cols = (k, m) if transa == _OP_T else (m, k)
        for layout, (rows, cols, ld) in zip(self.layouts, [(a_rows, a_cols, lda), (k, n, ldb), (m, n, m)]):
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows, cols, ld), "MatrixLayoutCreate")
        self.epilogue = epilogue

    def choose(self, ptrs: dict, stream: int) -> None:
        """The fastest of the heuristic's first ``CANDIDATES`` algorithms on the first call's operands (timed
        with CUDA events; the heuristic's first choice can be far off for these epilogues, bench/results note
        62). The heuristic reads the pointers' alignment: plans are made per alignment (``_alignment``)."""
        lib = _library()
        self.bind(ptrs)
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
        _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE, ctypes.c_uint64(WORKSPACE_BYTES))
        results, found = (_Heuristic * CANDIDATES)(), ctypes.c_int(0)
        a, b, d = self.layouts
        _check(lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, a, b, d, d, pref, CANDIDATES, results,
                                                  ctypes.byref(found)), "AlgoGetHeuristic")
        lib.cublasLtMatmulPreferenceDestroy(pref)
        algos = [r.algo for r in results[: found.value] if r.state == 0]
        if not algos:
            raise RuntimeError(f"cuBLASLt found no algorithm for epilogue {self.epilogue}")
        timings = [self._time(ptrs, algo, stream) for algo in algos] if len(algos) > 1 else [0.0]
        if min(timings) == float("inf"):
            raise RuntimeError(f"cuBLASLt could run none of the heuristic's algorithms for epilogue {self.epilogue}")
        self.algo = algos[min(range(len(algos)), key=timings.__getitem__)]

    def _time(self, ptrs: dict, algo, stream: int, reps: int = 5) -> float:
        """ms per launch; inf for an algorithm cuBLASLt refuses to launch (nothing runs then)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        try:
            self._launch(ptrs, algo, stream)
        except RuntimeError:
            return float("inf")
        start.record()
        for _ in range(reps):
            self._launch(ptrs, algo, stream)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps

    def bind(self, ptrs: dict) -> None:
        lib = _library()
        _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _BIAS_POINTER, ctypes.c_void_p(ptrs["bias"]))
        _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _AUX_POINTER, ctypes.c_void_p(ptrs["aux"]))

    def _launch(self, ptrs: dict, algo, stream: int) -> None:
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        la, lb, ld = self.layouts
        _check(_library().cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(one), ctypes.c_void_p(ptrs["a"]), la, ctypes.c_void_p(ptrs["b"]),
            lb, ctypes.byref(zero), ctypes.c_void_p(ptrs["d"]), ld, ctypes.c_void_p(ptrs["d"]), ld,
            ctypes.byref(algo), ctypes.c_void_p(ptrs["workspace"]), WORKSPACE_BYTES, ctypes.c_void_p(stream)), "Matmul")

    def run(self, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None,
            aux: torch.Tensor) -> None:
        ptrs = {"a": a.data_ptr(), "b": b.data_ptr(), "d": d.data_ptr(), "aux": aux.data_ptr(),
                "bias": 0 if bias is None else bias.data_ptr(), "workspace": _workspace(d.device).data_ptr()}
        stream = torch.cuda.current_stream(d.device).cuda_stream
        with _LOCK:
            if not hasattr(self, "algo"):
                self.choose(ptrs, stream)
            self.bind(ptrs)
            self._launch(ptrs, self.algo, stream)


_LOCK = threading.Lock()


def _alignment(*tensors: torch.Tensor) -> int:
    """The largest power of two up to 256 dividing every tensor's address: an algorithm chosen for aligned
    operands may not run on less aligned ones (views at an offset), so plans are cached per alignment."""
    address = functools.reduce(lambda acc, t: acc | (0 if t is None else t.data_ptr()), tensors, 256)
    return address & -address


@functools.cache
def _handle(device_index: int) -> ctypes.c_void_p:
    handle = ctypes.c_void_p()
    with torch.cuda.device(device_index):
        _check(_library().cublasLtCreate(ctypes.byref(handle)), "Create")
    return handle


@functools.cache
def _workspace(device: torch.device) -> torch.Tensor:
    return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)


@functools.cache
def _plan(device_index: int, dtype: torch.dtype, epilogue: int, transa: int, m: int, n: int, k: int, lda: int,
          ldb: int, alignment: int) -> _Plan:
    # ``alignment`` only keys the cache: the plan's algorithm is chosen on operands aligned so.
    return _Plan(_handle(device_index), _DTYPES[dtype], epilogue, transa, m, n, k, lda, ldb)


def supported(*tensors: torch.Tensor) -> bool:
    """The epilogue matmuls take contiguous bf16/fp16 CUDA tensors whose sizes are multiples of 8."""
    return all(t.is_cuda and t.dtype in _DTYPES and t.dtype == tensors[0].dtype and t.is_contiguous()
               and all(s % 8 == 0 for s in t.shape[-1:]) for t in tensors)


def linear_gelu_aux(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), w (N, K), b (N) -> (gelu_tanh(x w^T + b), x w^T + b), both (M, N) in x's dtype."""
    (rows, k), n = x.shape, w.shape[0]
    act, pre = x.new_empty(rows, n), x.new_empty(rows, n)
    # Column-major: act^T (n x rows) = op(w) x^T, w stored k x n (transposed), x stored k x rows.
    _plan(x.device.index, x.dtype, _GELU_AUX_BIAS, _OP_T, n, rows, k, k, k, _alignment(w, x, act, b, pre)).run(
        w, x, act, b, pre)
    return act, pre


def matmul_dgelu(g: torch.Tensor, w: torch.Tensor, pre: torch.Tensor, bias_grad: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """g (M, K), w (K, N), pre (M, N) -> ((g w) * gelu_tanh'(pre), its sum over the M rows or None), in g's
    dtype."""
    (rows, k), n = g.shape, w.shape[1]
    grad, bias = g.new_empty(rows, n), (g.new_empty(n) if bias_grad else None)
    # Column-major: grad^T (n x rows) = w^T g^T, w stored n x k, g stored k x rows.
    epilogue = _DGELU_BGRAD if bias_grad else _DGELU
    _plan(g.device.index, g.dtype, epilogue, _OP_N, n, rows, k, n, k, _alignment(w, g, grad, bias, pre)).run(
        w, g, grad, bias, pre)
    return grad, bias
