"""Gateway: StreamMesh's public edge. One TLS listener hosting GatewayService and AdminService;
access-token verification against auth's JWKS, a declared method -> roles table (default deny),
an audit trail of refused calls reported to auth off the request path, and forwarding to auth,
ingest and storage."""
