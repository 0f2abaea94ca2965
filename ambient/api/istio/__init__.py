"""Protobuf definitions in Istio's `istio.*` proto packages."""
