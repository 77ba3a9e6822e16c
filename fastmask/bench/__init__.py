"""The benchmark suite behind `fastmask bench` (installed, so it runs from any installed fastmask).

    fastmask bench                 # GPU: the layer grid, then the GPT-2 124M / XL steps; CPU: the CPU comparisons
    fastmask bench layer|model     # one part; --smoke: tiny shapes on any device (a check, not a measurement)
    fastmask bench report --add DIR  # append a run's CSVs to benchmarks/results, redraw the plot, rewrite the
                                     # README's performance table

Modules: ``layer`` (masked_linear forward+backward against dense, naive PyTorch, torch.compile of the naive
code and the fused backends; unit / head / sparse / eval-merged cases), ``model`` (one training step of a
random-init GPT-2, each configuration in its own process, with the loss-trajectory check), ``timing`` (do_bench
on GPUs, median and IQR of wall-clock rounds on CPUs), ``results`` (the CSV files and the environment columns),
``report`` (plot and README table), ``cli`` (the command). benchmarks/ in the source tree is the thin
pytest-benchmark / script layer over these modules. Nothing heavy is imported here.
"""
