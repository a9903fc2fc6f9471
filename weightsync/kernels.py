"""One batched GPU kernel that copies and/or checksums many byte regions in a single pass.

A round moves hundreds of tensors; launching one copy and one checksum per tensor would cost
more in launches than in bytes. Instead the regions are cut into fixed-size blocks listed in a
small table (source pointer, destination pointer, words, stream position), and one Triton
launch walks the whole table: each block is read once, optionally written to its destination,
and folded into the round's position-weighted checksum (see `weightsync.integrity`).

Triton ships with every CUDA build of torch; without it (or on the CPU) callers fall back to
plain torch operations with the same results.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

BLOCK_WORDS = 16384  # 128 KiB of 8-byte words per program (measured best on H200 among 32-256 KiB)
NUM_WARPS = 16
_LOOPS = {"ok": True}  # whether the capped-grid (looping) variant compiled here
WEIGHT_PERIOD = 65_521  # a prime: word weights cycle through 1..65521 (see integrity.py)


@functools.cache
def _triton() -> Any:  # the Triton kernel, or None where Triton is not usable
    try:
        from weightsync._triton_kernels import copy_digest
    except Exception:  # noqa: BLE001 - any import problem means "not usable here"
        return None
    return copy_digest


def triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" and _triton() is not None


def block_table(regions: list[tuple[int, int, int, int]], device: torch.device,
                aligned: bool = False) -> torch.Tensor:
    """The kernel's work list for whole-word regions (src_ptr, dst_ptr, words, word_position):
    one row per block of at most BLOCK_WORDS words, as an int64 [blocks, 4] tensor on `device`.

    `aligned` (every pointer 16-byte aligned, every word count even): pointers are stored as word
    offsets from the table's own address, which the kernel's ALIGNED variant expects."""
    rows = []
    for src, dst, words, position in regions:
        if words <= 0:
            continue
        starts = np.arange(0, words, BLOCK_WORDS, dtype=np.int64)
        part = np.empty((starts.size, 4), dtype=np.int64)
        part[:, 0] = src + starts * 8
        part[:, 1] = dst + starts * 8 if dst else 0
        part[:, 2] = np.minimum(words - starts, BLOCK_WORDS)
        part[:, 3] = position + starts
        rows.append(part)
    table = np.concatenate(rows) if rows else np.zeros((0, 4), dtype=np.int64)
    out = torch.empty(table.shape, dtype=torch.int64, device=device)
    if aligned and table.size:
        base = out.data_ptr()
        table[:, 0] = (table[:, 0] - base) // 8
        has_dst = table[:, 1] != 0
        table[:, 1] = np.where(has_dst, (table[:, 1] - base) // 8, 0)
    out.copy_(torch.from_numpy(table))
    return out


def run_blocks(table: torch.Tensor, copy: bool, digest: bool, aligned: bool = False,
               programs: int | None = None) -> torch.Tensor | None:
    """Launch the kernel over `table` on the current stream; with `digest`, return the int64 [2]
    (sum, weighted sum) of every word it read, still on the device (no host sync). `programs`
    caps the grid (each program then loops), to leave bandwidth to work running beside it."""
    kernel = _triton()
    blocks = table.shape[0]
    if blocks == 0:
        return torch.zeros(2, dtype=torch.int64, device=table.device) if digest else None
    partial = torch.empty((blocks, 2) if digest else (1, 2), dtype=torch.int64, device=table.device)
    loop = programs is not None and programs < blocks and _LOOPS["ok"]
    grid = programs if loop else blocks
    kernel[(grid,)](table, partial, blocks, grid, BLOCK=BLOCK_WORDS, PERIOD=WEIGHT_PERIOD,
                    COPY=copy, DIGEST=digest, ALIGNED=aligned, LOOP=loop, num_warps=NUM_WARPS)
    return partial.sum(0) if digest else None


def warm_up(device: torch.device | str) -> None:
    """Compile the kernel's variants now (a first round should not pay for it)."""
    device = torch.device(device)
    if not triton_usable(device):
        return
    with torch.cuda.device(device):
        words = torch.arange(2 * BLOCK_WORDS, dtype=torch.int64, device=device)  # two rows: loops too
        out = torch.empty_like(words)
        for aligned in (False, True):
            table = block_table([(words.data_ptr(), out.data_ptr(), words.numel(), 0)], device, aligned)
            for copy, digest in ((True, True), (True, False), (False, True)):
                run_blocks(table, copy, digest, aligned)
                if _LOOPS["ok"]:
                    try:
                        run_blocks(table, copy, digest, aligned, programs=1)
                    except Exception:  # noqa: BLE001 - a capped grid is an optimisation only
                        _LOOPS["ok"] = False
        torch.cuda.synchronize(device)
