"""Kubernetes installation: values -> objects (pure) -> applied with the ``kubernetes`` client.

Modules: ``values`` (what an operator chooses), ``render`` / ``nodes`` / ``crds`` /
``waypoint`` (pure renderers), ``validate`` (OpenAPI and CRD schema checks), ``apply`` (the
idempotent applier), ``commands`` (``ambientctl install | uninstall | manifest generate``),
``hostplugin`` (puts the CNI plugin on a node), ``files`` (``daemonset/*.yaml``).
"""

from ambient.install.render import render, to_yaml
from ambient.install.values import Values, ValuesError, load
from ambient.install.waypoint import render_waypoint

__all__ = ["Values", "ValuesError", "load", "render", "render_waypoint", "to_yaml"]
