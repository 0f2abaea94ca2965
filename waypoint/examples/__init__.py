"""Example extensions for the waypoint (request filters); see ``waypoint/filters.py``."""
