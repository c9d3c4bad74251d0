"""Plain-torch references of the ops: straightforward, materialising, for tests and benchmarks only."""
