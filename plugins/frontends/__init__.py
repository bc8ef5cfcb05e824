"""Front-ends: ``slimfleet_convert`` implementations that turn PyTorch, Paddle and
scikit-learn models into ONNX for ``compress`` (shared logic in ``slimfleet.host.convert``).

Each needs its framework, installed with an extra: ``pip install 'slimfleet[torch]'``,
``'slimfleet[sklearn]'``, ``'slimfleet[paddle]'``. Without it, a source the front-end
recognises is refused with that one line.
"""
