"""The engine's view of one event and its field paths: defined in `streammesh.definitions.events`
(shared with storage, which validates rule and window documents with the same code) and
re-exported here so engine modules keep one import path."""

from streammesh.definitions.events import MISSING, EngineEvent, FieldPathError, compile_field_path

__all__ = ["MISSING", "EngineEvent", "FieldPathError", "compile_field_path"]
