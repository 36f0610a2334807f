"""Which implementation runs each op: the dispatch table of `zoo.ops`.

Every dispatched op takes `impl: str = "auto"` and asks `choose(op, impl, tensor, unsupported)`:

    "torch"   the pure PyTorch path beside the op (always available)
    "triton"  zoo's own Triton kernels (zoo/ops/triton/): CUDA tensors, or any tensor when the
              process runs Triton's interpreter (TRITON_INTERPRET=1, which the tests set)
    "cuda"    the compiled packages of the ecosystem: mamba-ssm (ssd, selective_scan) and
              causal-conv1d, on CUDA tensors, when they import
    "auto"    CPU tensors -> torch; CUDA tensors -> cuda if installed, else triton, else torch

An "auto" argument is first replaced by the process-wide setting for that op (`set_kernels` or
the `use_kernels` context manager), if any. A model passes its recipe's `model.kernels` to its
blocks, which pass it to the ops explicitly, so a recipe's choice wins over the process setting.

An explicit impl that cannot run at all here (package missing, CPU tensor without the interpreter)
raises, saying why. One that is available but does not handle a particular call (an argument
its kernel lacks, say) falls back to the next choice of "auto", with a warning naming the reason,
once per reason: the op's caller asked for something real and gets the right answer.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Dict, Mapping, Optional

import torch

# op -> the implementations it has besides "auto", in the order "auto" prefers them on CUDA.
OPS: Dict[str, tuple] = {
    "ssd": ("cuda", "triton", "torch"),
    "selective_scan": ("cuda", "triton", "torch"),
    "causal_conv1d": ("cuda", "torch"),
    "selective_attention": ("triton", "torch"),
    "infini": ("triton", "torch"),
    "delta_rule": ("triton", "torch"),
}
IMPLS = ("auto", "torch", "triton", "cuda")

# The CUDA packages' entry points, imported on first use (a broken build, an ABI mismatch, must not
# break the pure paths, so any import error means "not available").
_CUDA_ENTRY = {
    "ssd": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "selective_scan": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_fn"),
}

_imports: Dict[tuple, tuple] = {}      # (module, attr) -> (object or None, reason or None)
_process: Dict[str, str] = {}          # the process-wide setting, op -> impl
_warned: set = set()


def optional_import(module: str, attr: Optional[str] = None):
    """(object, None) if `module` (and its `attr`) import, else (None, why). Cached per process."""
    key = (module, attr)
    if key not in _imports:
        try:
            mod = importlib.import_module(module)
            _imports[key] = (getattr(mod, attr) if attr else mod, None)
        except Exception as err:  # noqa: BLE001 - any failure to import means "not available"
            _imports[key] = (None, f"{module} does not import ({type(err).__name__}: {err})"[:300])
    return _imports[key]


def cuda_kernel(op: str):
    """The CUDA package's function for `op` (e.g. mamba_chunk_scan_combined), or None."""
    return optional_import(*_CUDA_ENTRY[op])[0] if op in _CUDA_ENTRY else None


def check_impl(op: str, impl: str, field: str = "impl") -> str:
    """Validates an (op, impl) pair; `field` names where the value came from in the error."""
    if op not in OPS:
        raise ValueError(f"{field}: unknown op {op!r} (known: {', '.join(OPS)})")
    allowed = ("auto",) + tuple(sorted(OPS[op]))
    if impl not in allowed:
        raise ValueError(f"{field}: {impl!r} is not an implementation of {op} (allowed: {', '.join(allowed)})")
    return impl


def check_kernels(kernels: Mapping[str, str], field: str = "kernels") -> Dict[str, str]:
    """Validates an op -> impl mapping such as a recipe's `model.kernels`."""
    for op, impl in kernels.items():
        if op not in OPS:
            raise ValueError(f"{field}.{op}: unknown op (known: {', '.join(OPS)})")
        check_impl(op, impl, f"{field}.{op}")
    return dict(kernels)


def interpreting() -> bool:
    """Triton's interpreter runs kernels on the CPU with numpy; it must be on before triton is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable(op: str, impl: str, device) -> Optional[str]:
    """Why `impl` cannot run `op` on `device` at all, or None if it can."""
    device = torch.device(device)
    if impl == "torch":
        return None
    if impl == "triton":
        if optional_import("triton")[1] is not None:
            return "triton: the triton package does not import"
        if device.type != "cuda" and not interpreting():
            return f"triton: needs CUDA tensors or TRITON_INTERPRET=1 (got a {device.type} tensor)"
        return None
    if impl == "cuda":
        if device.type != "cuda":
            return f"cuda: needs CUDA tensors (got a {device.type} tensor)"
        module, attr = _CUDA_ENTRY[op]
        why = optional_import(module, attr)[1]
        return None if why is None else f"cuda: {why}"
    raise ValueError(f"impl: unknown {impl!r} (allowed: {', '.join(IMPLS)})")


def _auto(op: str, device, unsupported: Mapping[str, str]) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return "torch"
    for impl in OPS[op]:
        if impl not in unsupported and unavailable(op, impl, device) is None:
            return impl
    return "torch"


def choose(op: str, impl: str, like, unsupported: Optional[Mapping[str, str]] = None) -> str:
    """The implementation that runs `op` for a call whose tensors live where `like` does.

    unsupported: impl -> why it cannot handle this particular call (its arguments, dtype)."""
    check_impl(op, impl)
    unsupported = unsupported or {}
    device = like.device if isinstance(like, torch.Tensor) else torch.device(like)
    if impl == "auto":
        impl = _process.get(op, "auto")
    if impl == "auto":
        return _auto(op, device, unsupported)
    why = unavailable(op, impl, device)
    if why is not None:
        raise RuntimeError(f"{op}: impl {impl!r} is unavailable: {why}")
    if impl in unsupported:
        fallback = _auto(op, device, {**unsupported, impl: unsupported[impl]})
        key = (op, impl, unsupported[impl])
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{op}: impl {impl!r} does not handle this call ({unsupported[impl]}); "
                          f"running {fallback!r} instead", stacklevel=3)
        return fallback
    return impl


def chosen(device, kernels: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """op -> the implementation a call with default arguments would run on `device`, given a
    model's `kernels` setting on top of the process-wide one. An unavailable choice reads
    "<impl> (unavailable: why)" instead of raising, so a report can still be printed."""
    kernels = kernels or {}
    out = {}
    for op in OPS:
        try:
            out[op] = choose(op, kernels.get(op, "auto"), device)
        except RuntimeError as err:
            out[op] = f"{kernels.get(op) or _process.get(op)} (unavailable: {str(err).split(': ', 2)[-1]})"
    return out


def describe_kernels(device, kernels: Optional[Mapping[str, str]] = None) -> str:
    """One line, "ssd=torch selective_scan=torch ...", for logs and result files."""
    return " ".join(f"{op}={impl}" for op, impl in chosen(device, kernels).items())


def set_kernels(kernels: Optional[Mapping[str, str]] = None, **more: str) -> Dict[str, str]:
    """Sets the process-wide choice per op (replacing the previous one; "auto" or no entry clears
    an op). Returns the previous setting."""
    new = check_kernels({**(kernels or {}), **more})
    previous = dict(_process)
    _process.clear()
    _process.update({op: impl for op, impl in new.items() if impl != "auto"})
    return previous


@contextlib.contextmanager
def use_kernels(kernels: Optional[Mapping[str, str]] = None, **more: str):
    """`with use_kernels(ssd="triton"): ...` sets those ops on top of the current process setting."""
    previous = set_kernels({**_process, **(kernels or {}), **more})
    try:
        yield
    finally:
        set_kernels(previous)

