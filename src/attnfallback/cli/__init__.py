"""The command line: one module per command, each returning data that tests can check."""
