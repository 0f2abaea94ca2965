"""Shared pytest configuration for the ambient test suite.

The netns and e2e tiers need root (network namespaces, iptables); CI runs as root.  They are
not skipped without it: they fail, so a green run always means they ran.
"""
