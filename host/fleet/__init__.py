"""Fleet side: fleet.yaml, signing keys, publishing models and assigning them to devices."""
