"""``python -m evo_compress`` and the ``evo-compress`` command: Ctrl-C handling first, then
the command line (whose imports take a moment a user may interrupt)."""

from __future__ import annotations


def main() -> None:
    from evo_compress._interrupt import exit_on_interrupt

    exit_on_interrupt()
    from evo_compress.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
