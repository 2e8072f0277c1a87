"""zerotunnel.node."""
