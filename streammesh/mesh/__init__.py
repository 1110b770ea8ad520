"""The mesh runtime shared by every StreamMesh service: identity, PKI, settings, servers,
channels and the mesh client, authorization policy, errors and logging."""

from streammesh.mesh.channel import create_channel, service_config
from streammesh.mesh.client import MeshClient, MeshClientConfig, TlsFiles
from streammesh.mesh.errors import StreamMeshError
from streammesh.mesh.identity import operator_id, peer_identity, service_id
from streammesh.mesh.logs import configure_logging
from streammesh.mesh.pki import TlsMaterial, init_pki
from streammesh.mesh.policy import ANY_PEER, PeerPolicy
from streammesh.mesh.server import (
    MeshServer,
    ServiceBinding,
    create_mesh_server,
    run_until_signalled,
)
from streammesh.mesh.settings import ServiceSettings, default_state_dir

__all__ = [
    "ANY_PEER",
    "MeshClient",
    "MeshClientConfig",
    "MeshServer",
    "PeerPolicy",
    "ServiceBinding",
    "ServiceSettings",
    "StreamMeshError",
    "TlsFiles",
    "TlsMaterial",
    "configure_logging",
    "create_channel",
    "create_mesh_server",
    "default_state_dir",
    "init_pki",
    "operator_id",
    "peer_identity",
    "run_until_signalled",
    "service_config",
    "service_id",
]
