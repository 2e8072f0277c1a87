"""zerotunnel.hbone."""
