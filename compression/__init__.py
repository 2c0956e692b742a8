"""Lyceum compression: analysis, structured pruning, quantization and NAS (imports nothing of the service)."""
