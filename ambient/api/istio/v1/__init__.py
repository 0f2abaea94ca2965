"""Istio v1 APIs (proto package `istio.v1`)."""
