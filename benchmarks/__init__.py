"""``fewstep bench`` benchmarks, one module per subcommand (``fewstep bench <name>`` → ``benchmarks/<name>.py``).

A benchmark module is imported when the CLI builds its parser, so it keeps torch/diffusers imports inside its
functions, and exposes:

* ``HELP``: one line for ``fewstep bench --help``;
* ``add_arguments(parser)``: its options (``--json FILE`` is added by the command for every benchmark);
* ``run(args) -> dict``: runs it and returns the JSON-ready result;
* ``format_table(result) -> str``: the table printed after the run.

``sd15`` builds the real SD1.5 architecture with random weights (no download) for benchmarks that need it.
"""
