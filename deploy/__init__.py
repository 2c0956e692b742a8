"""Lyceum deploy layer: the `lyceum` CLI, the local launcher, example models and data."""
