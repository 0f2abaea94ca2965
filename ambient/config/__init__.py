"""Configuration sources, each producing the xDS protos istiod would push.

- ``local``: ztunnel's local YAML (``LOCAL_XDS_PATH`` / ``LOCAL_XDS``).
- ``manifests``: Kubernetes objects (multi-document YAML or dicts), translated like istiod.

Both are pure (text or dicts in, ``(key, proto)`` pairs out) and never raise on bad input:
problems come back as error strings naming the entry and field.
"""
