"""Subcommands of the ``mas-triplets`` console script: one module each, with
``add_parser(subparsers) -> ArgumentParser`` and ``run(args) -> int``.
Modules import heavy dependencies inside ``run`` so that ``--help`` stays fast."""
