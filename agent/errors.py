"""The one error family of slimfleet: every message is one line a user can act on."""

from __future__ import annotations


class SlimfleetError(Exception):
    """An expected failure, reported as one line with no traceback.

    ``exit_code`` is what a CLI exits with: 1 means the operation failed,
    2 means the input (a file, a flag, a config) was wrong.
    """

    exit_code = 1


class InputError(SlimfleetError):
    """A file, option or config given by the user is invalid."""

    exit_code = 2


class ConfigError(InputError):
    """A config file (agent.yaml, fleet.yaml) is invalid; the message names file and line."""


class VerifyError(SlimfleetError):
    """A manifest, signature, chunk or model failed verification."""


class KeyRevoked(VerifyError):
    """A document verifies, but its signing key is revoked: final, where a spoiled or
    forged copy on the broker is worth retrying."""
