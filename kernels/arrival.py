"""The last program to arrive: how one launch sums per-program partial results in a fixed order,
with no float atomics and no second kernel (the attention backward's dQ partials, the elementwise
backward's db1 partial sums, the one-kernel backward's atomic dQ buffer).

Each program writes its part, then counts itself in on an int32 counter the launcher zero-filled;
the program that counts last reads everyone's parts and writes the result. The barrier makes every
thread's writes precede the count, the acquire-release add at GPU scope publishes them to the last
program, which must read them at L2 (``.cg`` loads), never from a stale L1 line.

The counters count in generations of ``members``: the last program of a launch is the one whose
count ends a generation. Triton's autotuner launches a kernel many times on the same arguments when
it times a new key's configs (and once more with the winner); each launch finds the counters at a
multiple of ``members`` and still writes its result. Counting up to ``members`` once, every launch
after the first skipped the result, and the output kept the first timed config's bits.
"""

import triton
import triton.language as tl


@triton.jit
def last_to_arrive(counter, members):
    """Counts this program in at ``counter``; whether it is the last of ``members`` to arrive."""
    tl.debug_barrier()  # every thread's writes are issued before the count releases them
    return (tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") + 1) % members == 0
