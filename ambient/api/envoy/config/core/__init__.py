"""Envoy core configuration types (`envoy.config.core`)."""
