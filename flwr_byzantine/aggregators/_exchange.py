"""The selection networks' compare-exchange as one compiled operation (issue 12, compile time).

Written in Python as ``s = b < a; a, b = (b, a) if s else (a, b)`` every exchange is two branches in numba's
IR: numba's SSA reconstruction and type inference then take most of a network's compile time (the unrolled
median of 31 values, :mod:`._median31`: 17-19 s a signature on a 2-core AVX2 machine, 0.8 s of it in LLVM).  In
compiled code :func:`compare_exchange` is one ordered compare and two selects in one basic block (the same values,
bit for bit, at the same measured speed), about 3 s a signature.
"""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic, overload


def compare_exchange(a, b):
    """``(b, a) if b < a else (a, b)``: the smaller first.

    The compare is IEEE ordered: with a NaN nothing moves; ``-0.0`` and ``0.0`` stay where they are.  In compiled
    code (two floats of one type) it is :func:`_select_pair`: no branch.
    """
    return (b, a) if b < a else (a, b)


@intrinsic
def _select_pair(typingctx, a, b):
    """:func:`compare_exchange` as ``fcmp olt`` and two ``select``."""
    if not isinstance(a, types.Float) or a != b:
        return None

    def codegen(context, builder, signature, args):
        x, y = args
        swap = builder.fcmp_ordered("<", y, x)
        return context.make_tuple(builder, signature.return_type,
                                  (builder.select(swap, y, x), builder.select(swap, x, y)))

    return types.UniTuple(a, 2)(a, b), codegen


@overload(compare_exchange, jit_options={"cache": True})
def _compare_exchange_compiled(a, b):
    if isinstance(a, types.Float) and a == b:
        return lambda a, b: _select_pair(a, b)
    return None
