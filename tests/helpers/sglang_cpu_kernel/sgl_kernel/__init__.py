"""A pure-torch stand-in for SGLang's kernel package on a CPU machine: TEST INFRASTRUCTURE ONLY.

SGLang's CPU engine (`SGLANG_USE_CPU_ENGINE=1`) imports a few `*_cpu` functions from `sgl_kernel`
at module level, and no CPU build of that package can be installed here (the registry's
`sglang-kernel` ships CUDA libraries only; see ../shared/reference/sglang-on-cpu.md). The tests
put this directory on the server's PYTHONPATH, never the backend's: weightsync_sglang does not
import it.

A dense model calls one of them: `assign_req_to_token_pool_cpu`, written here in torch. Every
other `*_cpu` name imports (so SGLang's modules load) and raises if called, so a path that needs a
real kernel fails loudly instead of computing something else. No torch op is registered: SGLang
then finds no AMX kernels and takes its own torch fallbacks (norms, rotary, attention).
"""

from __future__ import annotations

from typing import Any, NoReturn

import torch


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """Write each request's slots into its row of the token pool: row `req_pool_indices[i]`,
    columns `start_offset[i]:end_offset[i]`, from the next `end - start` entries of
    `out_cache_loc` (the requests' slots, concatenated in batch order), as SGLang's Triton kernel
    does on GPUs. `pool_len` is the row length (the kernel's pointer arithmetic; unused here)."""
    del pool_len
    taken = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist(), strict=True):
        length = end - start
        req_to_token[row, start:end] = out_cache_loc[taken:taken + length].to(req_to_token.dtype)
        taken += length


def _missing(name: str) -> Any:
    def kernel(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(f"sgl_kernel.{name}: the test stand-in has no such kernel (CPU tests "
                                  "serve dense models through SGLang's torch fallbacks)")
    kernel.__name__ = name
    return kernel


def __getattr__(name: str) -> Any:
    """`from sgl_kernel import x_cpu` succeeds (a stub that raises when called); any other name
    is missing, so SGLang's availability probes (`try: from sgl_kernel import ...`) say no."""
    if name.endswith("_cpu"):
        return _missing(name)
    raise AttributeError(f"module 'sgl_kernel' has no attribute {name!r} (test stand-in)")
