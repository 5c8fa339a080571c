"""The sidecar key agent: key service, wire protocol, socket server, client, launcher, entry point."""
