"""Runtime side of vssflow: inputs, solvers, backends, streaming. Imports no torch by itself."""
