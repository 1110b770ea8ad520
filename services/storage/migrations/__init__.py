"""Versioned SQL for the storage schema, applied in order by `streammesh.mesh.postgres.migrate`."""
