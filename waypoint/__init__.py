"""waypoint: the optional L7 proxy. Not built yet (issue 5); this package is a placeholder."""
