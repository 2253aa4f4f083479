"""A config and a workdir made into a run and back; what the commands share."""
