"""The subcommands of the ``controlmd`` command, one module each.

Every module declares ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> exit status``, and imports what it runs inside ``run`` (building the parser
stays cheap). The table of subcommands is :data:`controlmd.cli.COMMANDS`.
"""
