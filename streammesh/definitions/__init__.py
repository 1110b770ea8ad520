"""Rule and window definitions as data: the pure model (no I/O) shared by the processor's engine,
which runs them, and storage, which validates a definition before it stores it, so both read a
document the same way and neither imports the other's internals."""

from streammesh.definitions.documents import (
    KIND_RULE,
    KIND_WINDOW,
    KINDS,
    DefinitionProblem,
    check_definition,
)

__all__ = ["KINDS", "KIND_RULE", "KIND_WINDOW", "DefinitionProblem", "check_definition"]
