"""File formats: VNN-LIB properties and counterexamples (vnnlib), result files (results)."""
