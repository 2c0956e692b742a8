"""Lyceum student client: knowledge sources, merger, DistillLoader, losses and trainer."""
