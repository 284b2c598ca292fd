"""Helper commands: everything on the command line that is not a stage."""
