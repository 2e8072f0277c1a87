"""zerotunnel.waypoint."""
