"""HBONE: HTTP/2 CONNECT tunnels over mTLS (Istio ambient's data-plane protocol).

``protocol`` is the sans-I/O core, ``aio`` the asyncio edge (streams, server, relay) and
``pool`` the client connection pool. Import from the submodules.
"""
