"""Envoy core types used by xDS: Node and friends (`envoy.config.core.v3`)."""
