"""Benchmark jobs, one module per stage. Each compares against a baseline in the same run and
prints and saves a table (ratios, not absolute times): `mgh-ray benchmark <config> --stage NAME`."""
