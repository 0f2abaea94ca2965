"""Workload discovery resources (proto package `istio.workload`)."""
