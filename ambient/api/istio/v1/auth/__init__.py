"""Certificate signing service (proto package `istio.v1.auth`)."""
