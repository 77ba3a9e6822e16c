"""A toy experiment on fastmask.experiments.runner (run by test_runner.py as a script and in-process): a masked
two-layer MLP, data order from a BatchStream, global torch RNG and mask noise inside each step."""

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch

import fastmask as fm
from fastmask.experiments.runner import (BatchStream, Run, RunConfig, TrainState, add_config_arguments,
                                         config_from_args, seed_everything)


@dataclass
class ToyConfig(RunConfig):
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate"})
    batch: int = field(default=4, metadata={"help": "batch size"})
    sleep: float = field(default=0.0, metadata={"help": "seconds to wait per step (kill tests)"})
    tags: list = field(default_factory=lambda: ["a"], metadata={"help": "free-form labels"})


def build_parser():
    parser = argparse.ArgumentParser(prog="toy")
    add_config_arguments(parser, ToyConfig)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(ToyConfig, args, experiment="toy")
    run = Run(config, resume=args.resume, overwrite=args.overwrite, experiment="toy")
    seed_everything(config.seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    fm.apply(model, fm.MaskConfig(estimator="gumbel_sigmoid_st", targets=[r"^0$", r"^2$"], init_keep=0.6,
                                  seed=config.seed))
    data_x, data_y = torch.randn(23, 6), torch.randn(23, 3)
    optimizer = torch.optim.Adam(fm.mask_parameters(model), lr=config.lr)
    state = TrainState(params={n: layer.logits for n, layer in fm.masked_modules(model).items()},
                       optimizer=optimizer, model=model,
                       streams={"train": BatchStream(23, config.batch, seed=config.seed)})
    run.restore(state)
    model.train()

    def step_fn(step):
        index = state.streams["train"].next()
        x = data_x[index] + 0.1 * torch.randn(len(index), 6)  # the global torch RNG, restored on resume
        loss = ((model(x) - data_y[index]) ** 2).mean() + 0.01 * fm.l0_penalty(model, normalize=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if config.sleep:
            time.sleep(config.sleep)
        return {"loss": loss.item(), "density": fm.l0_penalty(model, normalize=True).item()}

    history = run.train(state, step_fn, show=("loss",))
    run.save_masks(model)
    run.write_metrics({"final_loss": history[-1]["loss"]})
    run.plot_history(history, ["loss"], "loss.png", secondary=["density"])
    run.write_report("# toy\n")
    print(run.finished_message())
    return 0


if __name__ == "__main__":
    sys.exit(main())
