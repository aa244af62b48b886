"""Helper modules shared by the tests (no tests here).

* ``training``: the recording logger, the quiet Trainer, warning filters, weights, example loading, a free port;
* ``ddp``: two-process ``ddp_spawn`` Trainers, a rank-strided dataset and the per-rank report;
* ``models``: small MLPs/RNNs, regression data and the reference gradient-norm probe (GradientFlowCallback);
* ``gate_models``, ``sharpness_models``, ``collapse_models``: the models and data of each callback's tests;
* ``matrix_models`` and ``matrix_runner``: the support matrix's tiny LSTM and the code that runs one cell;
* ``strategies`` and ``stats_checks``: hypothesis strategies for tensors, and tolerances against the float64 oracle.
"""
