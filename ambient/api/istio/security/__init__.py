"""L4 authorization resources (proto package `istio.security`)."""
