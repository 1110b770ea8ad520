"""The storage service: the event store in PostgreSQL (idempotent batched writes, paged queries,
counts), reached only through `streammesh.storage.v1.StorageService`."""
