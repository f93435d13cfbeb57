"""``fewstep bench`` benchmarks, one module per subcommand (``fewstep bench <name>`` → ``benchmarks/<name>.py``).

A benchmark module is imported when the CLI builds its parser, so it keeps torch/diffusers imports inside its
functions, and exposes:

* ``HELP``: one line for ``fewstep bench --help``;
* ``add_arguments(parser)``: its options (``--json FILE`` is added by the command for every benchmark);
* ``run(args) -> dict``: runs it and returns the JSON-ready result;
* ``format_table(result) -> str``: the table printed after the run.

``sd15`` builds the real SD1.5 architecture with random weights (no download) for benchmarks that need it.

Modules run with ``python -m fewstep.benchmarks.<name>`` (measurements too slow or narrow for ``fewstep bench``) keep
the same contract and call :func:`script_main` from their ``main``.
"""


def script_main(module, argv: list[str] | None = None) -> int:
    """``python -m`` entry of a benchmark module: its options, its run, its table."""
    import argparse

    parser = argparse.ArgumentParser(description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    print(module.format_table(module.run(parser.parse_args(argv))))
    return 0


def mean_sd_cells(row: dict, metrics) -> str:
    """A table row's ``metric ± sd`` cells, 17 characters each: FD with 2 decimals, the others with 3."""
    return "".join(
        f"{row[m]:>8.2f} ± {row[m + '_sd']:<6.2f}" if m == "fd" else f"{row[m]:>8.3f} ± {row[m + '_sd']:<6.3f}"
        for m in metrics
    )
