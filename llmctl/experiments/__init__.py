"""Experiments: grids of runs (sweep) and side-by-side comparison of runs (compare)."""
