"""``mmoe train`` / ``mmoe eval`` (placeholder, being written)."""


def add_train_args(parser):
    pass


def add_eval_args(parser):
    pass


def run_train(args):
    from mmoe.cli import CLIError

    raise CLIError("mmoe train is not built yet")


run_eval = run_train
