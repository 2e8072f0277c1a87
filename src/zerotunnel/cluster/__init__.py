"""zerotunnel.cluster."""
