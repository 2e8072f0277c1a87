"""zerotunnel.control."""
