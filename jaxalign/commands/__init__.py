"""The `jaxalign` subcommands, one module per group, each with `add_commands(subparsers)`.

They parse arguments, call a program (`jaxalign.programs`) or the library, and print. Nothing outside this
package and `jaxalign.cli` imports them (tests/test_layout.py).
"""
