"""The slimfleet edge agent and the wire format shared with the host.

This package must stay importable on a device that has only the base install:
it never imports ``slimfleet.host``, ``slimfleet.plugins``, onnx, onnxsim or pluggy.
"""
