"""One module per command (``NAME``, ``HELP``, ``command``)."""
