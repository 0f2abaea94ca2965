"""Delta xDS messages and the ADS service (`envoy.service.discovery.v3`)."""
