"""zerotunnel.cli."""
