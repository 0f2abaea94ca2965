"""RPC status (proto package `google.rpc`)."""
