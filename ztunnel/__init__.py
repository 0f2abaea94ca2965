"""ztunnel: the per-node L4 proxy (in-pod listeners, HBONE, L4 policy, metrics)."""
