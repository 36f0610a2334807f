"""The `zoo` command's evaluation subcommands (eval, compare), one module each with `main(argv) -> exit code`."""
