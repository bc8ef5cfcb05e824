"""The workstation side of slimfleet: compression, publishing and fleet commands."""
