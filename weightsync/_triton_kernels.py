"""The Triton kernels behind `weightsync.kernels` (imported only where Triton is installed).

Kept in a module of their own so that the kernels are module-level functions (Triton resolves a
kernel's callees through its module's globals) while the rest of the package imports without Triton.
"""

import triton
import triton.language as tl


@triton.jit
def one_row(table_ptr, partial_ptr, r, BLOCK: tl.constexpr, PERIOD: tl.constexpr,
            COPY: tl.constexpr, DIGEST: tl.constexpr, ALIGNED: tl.constexpr):
    row = table_ptr + r * 4
    offsets = tl.arange(0, BLOCK)
    if ALIGNED:
        # Rows hold word offsets from the (16-byte aligned) table itself, all even, and even
        # counts: the compiler may then move 16 bytes per access.
        src = table_ptr + tl.multiple_of(tl.load(row), 2)
        count = tl.multiple_of(tl.load(row + 2), 2)
    else:
        src = tl.load(row).to(tl.pointer_type(tl.int64))
        count = tl.load(row + 2)
    mask = offsets < count
    words = tl.load(src + offsets, mask=mask, other=0)
    if COPY:
        if ALIGNED:
            dst = table_ptr + tl.multiple_of(tl.load(row + 1), 2)
        else:
            dst = tl.load(row + 1).to(tl.pointer_type(tl.int64))
        tl.store(dst + offsets, words, mask=mask)
    if DIGEST:
        # Weight of word p is (p mod PERIOD) + 1; BLOCK < PERIOD, so one subtraction wraps it.
        base = (tl.load(row + 3) % PERIOD).to(tl.int32)
        weight = base + offsets
        weight = tl.where(weight >= PERIOD, weight - PERIOD, weight) + 1
        tl.store(partial_ptr + r * 2, tl.sum(words, axis=0))
        tl.store(partial_ptr + r * 2 + 1, tl.sum(words * weight.to(tl.int64), axis=0))

@triton.jit
def copy_digest(table_ptr, partial_ptr, rows, programs, BLOCK: tl.constexpr, PERIOD: tl.constexpr,
                COPY: tl.constexpr, DIGEST: tl.constexpr, ALIGNED: tl.constexpr, LOOP: tl.constexpr):
    pid = tl.program_id(0)
    if LOOP:  # fewer programs than rows: each walks every n-th row (bounded SM and memory share)
        for r in range(pid, rows, programs):
            one_row(table_ptr, partial_ptr, r, BLOCK, PERIOD, COPY, DIGEST, ALIGNED)
    else:
        one_row(table_ptr, partial_ptr, pid, BLOCK, PERIOD, COPY, DIGEST, ALIGNED)
