"""Run the many tiny optimisations of a fit with a single BLAS thread.

scipy's L-BFGS-B calls BLAS on vectors of a few elements. A threaded OpenBLAS wakes its pool for
each call, which on a busy machine (a node shared with training jobs) makes a bootstrap ~100x
slower than the arithmetic. threadpoolctl does this properly when installed; otherwise OpenBLAS
copies already loaded in the process are asked directly, and anything else is left alone.
"""

from __future__ import annotations

import ctypes
import functools
from contextlib import contextmanager

_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads",
            "scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_")


def _loaded_openblas() -> list:
    """(set, get) function pairs of every OpenBLAS mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return []
    pairs = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for setter in _SETTERS:
            getter = setter.replace("set_num_threads", "get_num_threads")
            if hasattr(lib, setter) and hasattr(lib, getter):
                pairs.append((getattr(lib, setter), getattr(lib, getter)))
                break
    return pairs


_depth = 0  # nesting level: only the outermost context touches the libraries


@contextmanager
def single_blas_thread():
    global _depth
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    _depth = 1
    try:
        if threadpool_limits is not None:
            with threadpool_limits(limits=1, user_api="blas"):
                yield
            return
        pairs = _loaded_openblas()
        previous = [get() for _, get in pairs]
        for set_threads, _ in pairs:
            set_threads(1)
        try:
            yield
        finally:
            for (set_threads, _), n in zip(pairs, previous):
                set_threads(n)
    finally:
        _depth = 0


def one_blas_thread(func):
    """Decorator form of `single_blas_thread`."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with single_blas_thread():
            return func(*args, **kwargs)

    return wrapper
