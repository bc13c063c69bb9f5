"""The training engine and what it stands on.

- `engine`: `Trainer` (one for every task: DeepSpeed, expert parallelism, data order, checkpoints, logging);
- `tasks`: the `Task` contract, `TaskContext`, the `Evaluator` protocol, the task registry;
- `config`: `TrainConfig` and its sections; `configfile`: the strict YAML/dataclass loader;
- `deepspeed`: the only module that imports DeepSpeed; `sharding`: expert sharding; `optim`: parameter groups
  and the lr schedule; `ema`: a weight EMA; `checkpoint`, `runlog`, `perf`.

Nothing is imported here, so ``mmoe train --help`` stays light.
"""
