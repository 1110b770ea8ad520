"""Ingest: validates event batches, partitions them by key and appends them to Redis Streams."""
