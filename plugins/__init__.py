"""Built-in slimfleet plugins: each module registers itself through the public hooks,
exactly as a third-party package would (see ``slimfleet.host.plugins.BUILTIN_PLUGINS``)."""
