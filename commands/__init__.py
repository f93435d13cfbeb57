"""Subcommands of the ``fewstep`` CLI, one module each (discovered by ``fewstep.cli``)."""
