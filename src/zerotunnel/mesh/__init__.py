"""zerotunnel.mesh."""
