"""Triton kernels for the zoo's own operators. Imported only when a kernel is chosen (see the op
modules' dispatch): nothing here loads unless Triton is installed and asked for."""
