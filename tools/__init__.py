"""Developer tools of the repository (never shipped in the wheel): ``python -m tools.mutate``."""
