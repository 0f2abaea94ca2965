"""cni: chained CNI plugin and node agent. Not built yet (issue 3); placeholder."""
