"""The source and destination agents, the install paths and the convergence policy."""
