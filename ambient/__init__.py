"""ambient: the shared core of the mesh.

Protobuf definitions of the wire contract (``ambient.api``), SPIFFE identities, the CA and TLS
helpers, the sans-I/O HBONE protocol, the mesh model and its authorization evaluator, the
configuration sources, the local cluster harness and the ``ambientctl`` CLI.
"""

__version__ = "0.1.0"
