"""Volumes larger than memory: streaming ingestion, bounded patch reads and streaming
sliding-window prediction on chunked (tensorstore) arrays. See docs/VOLUMES.md."""
