"""Lyceum teacher server: model loading, batched inference, online servers and the offline dump."""
