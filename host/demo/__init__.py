from slimfleet.host.demo.command import demo

__all__ = ["demo"]
