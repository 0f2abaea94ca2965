"""Envoy configuration types (`envoy.config`)."""
