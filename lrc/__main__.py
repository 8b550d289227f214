"""`python -m lrc` runs the CLI."""

from .cli import console_main

console_main()
