"""Sub-commands of the ``pacofr`` command line, one module each (see ``pacofr.cli``)."""
