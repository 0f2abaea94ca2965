"""Envoy gRPC services (`envoy.service`)."""
