"""isobox.network: NAT networks, IPAM, port publishing (the Host Networking Service)."""
