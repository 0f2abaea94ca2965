"""Minimal Google API protobuf definitions (`google.*` proto packages)."""
