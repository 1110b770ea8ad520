"""The processor's source: what it takes from the queue and how it gives it back.

Ownership of partitions (leases, `ownership.py`), reading and reclaiming their entries, the fenced
acknowledgement, trimming (`trimming.py`) and the backlog counters' corrections (`backlog.py`).
It knows nothing of storage: `services.processor.delivery` stores what the source read, and
`worker.py` wires the two (an import test keeps the layers apart)."""
