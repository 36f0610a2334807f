"""The `zoo` command's library-side subcommands, one module each with `main(argv) -> exit code`
(zoo/cli.py dispatches; evals/commands/ holds the evaluation ones)."""
