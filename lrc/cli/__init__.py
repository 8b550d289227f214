"""The `lrc` command line (see `app`); `main(argv) -> exit code` runs it, `console_main` is the entry point."""

from .app import app, console_main, main

__all__ = ["app", "console_main", "main"]
