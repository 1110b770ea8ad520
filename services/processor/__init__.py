"""Processor: consumer-group workers that move queued batches into storage, acknowledging each
Redis entry only after storage committed it. Each partition is worked on by one processor at a
time (leases, `source/ownership.py`), which keeps per-key order across scale-out and failover."""
