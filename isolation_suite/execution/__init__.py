"""Running a scenario: the training loop, execution modes, ddp ranks, the sandbox, the reference."""
