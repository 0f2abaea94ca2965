"""Minimal Envoy xDS protobuf definitions (`envoy.*` proto packages)."""
