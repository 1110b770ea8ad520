"""The processor's source: what it takes from the queue and how it gives it back.

Ownership of partitions (leases, `ownership.py`); each round's read, the claims and reclaims,
and the fenced acknowledgement (`partitions.py`); trimming (`trimming.py`); the backlog
counters' corrections (`backlog.py`). It knows nothing of storage: delivery
(`services.processor.delivery`) stores what the source read, and `worker.py` wires the two
(tests/processor/test_layers.py keeps them apart)."""
