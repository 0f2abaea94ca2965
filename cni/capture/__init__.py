"""Capture backends: iptables, nftables and eBPF behind one interface (see ``base``)."""
