"""The processor's stream-processing engine: clock and watermarks, windows and aggregates, pattern
rules, and their state. Pure logic with no I/O at all (no Redis, Postgres, gRPC, sockets, files
or asyncio), so that it is deterministic, replayable and testable in process; the processor's
source and delivery parts feed it events and watermarks and persist what it returns.
`tests/processor/engine/test_no_io.py` keeps it so."""
