"""Egress: the proxy a plugin with `permissions.net.allow` reaches the network through
(Squid, with the helpers here), the rules it decides by, and the per-run grants."""
