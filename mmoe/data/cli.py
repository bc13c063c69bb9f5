"""``mmoe shards`` (placeholder, being written)."""


def add_args(parser):
    pass


def run(args):
    from mmoe.cli import CLIError

    raise CLIError("mmoe shards is not built yet")
