"""A flag passed to compiled code as a run-time ``bool`` (issue 12, compile time).

numba types a ``True`` or ``False`` written in compiled code as a *literal* and compiles the function it is passed
to once for each: the saddle solver's eigenproblem (:func:`.saddle._eig_p`, with or without eigenvectors) was
compiled twice, and with it every callee that takes the flag on (:mod:`.small_eigh`: the reduction, the QL
iteration).  ``runtime_bool(True)`` is the same value typed as a plain ``bool``: one compiled function serves both
values, which the callee then tests at run time (a branch per call, not per element).
"""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic, overload


def runtime_bool(flag: bool) -> bool:
    """``bool(flag)``; in compiled code a plain ``bool``, never a literal ``True`` / ``False``."""
    return bool(flag)


@intrinsic
def _as_boolean(typingctx, flag):
    """The flag's value with the type ``boolean`` (a literal's value, cast)."""
    if not isinstance(flag, types.Boolean):
        return None

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[0], signature.args[0], types.boolean)

    return types.boolean(flag), codegen


@overload(runtime_bool, jit_options={"cache": True})
def _runtime_bool_compiled(flag):
    if isinstance(flag, types.Boolean):
        return lambda flag: _as_boolean(flag)
    return None
