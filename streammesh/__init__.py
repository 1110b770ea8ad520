"""StreamMesh: a real-time event pipeline on a mutual-TLS gRPC service mesh."""
