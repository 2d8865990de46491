"""Scripts that measure and print tables, run from the repository root as
`python -m benchmarks.NAME` (never by tox); their results are in
benchmarks/results/."""
