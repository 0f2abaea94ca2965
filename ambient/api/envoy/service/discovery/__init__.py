"""Envoy discovery services (`envoy.service.discovery`)."""
