"""Tolerances shared by the kernels' tests."""

import numpy as np

#: Relative tolerance of the compiled passes' squared norms and dot products against float64 sums of the same
#: differences (the kernels module's *Reductions*: a float32 tile of ``KERNEL_TILE`` squares is summed in float32
#: lanes, to about 1e-7 of the sum; float64 rows are summed in float64 throughout).
SUM_RTOL = {np.float32: 1e-5, np.float64: 1e-12}
