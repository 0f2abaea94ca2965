"""cni: the chained CNI plugin, its installer, the node agent, ZDS and the capture backends."""
