"""zerotunnel.gateway."""
