"""Shared code for the reproduction of "On progressive sharpening, flat minima and
generalisation" (MacDonald, Valmadre, Lucey). `import common` gives every name below.

Where each name lives:
  estimators    sharpness, gauss_newton_norm, jacobian_norm, hessian_operator,
                gauss_newton_operator, top_eigenvalues, EigenResult, MappingInput, MeasureMode,
                no_tf32.
                Self-contained (torch and the standard library): copy the file.
  data          DATASETS, Data, load_data, load_arrays, subset_indices, standardisation stats.
  models        MLP (ReLU / tanh / Gaussian), VGG11, ResNet18, MODELS, build_model.
  training      losses, ghost_batch_gradient, train_step (GD, SGD, SAM), evaluate, augment, mixup,
                jacobian_penalty.
  measurements  progressive_sharpening_metrics (Figs 1, 6-11, 28-29) with step_curvature and
                realised_curvature (curvature along the top eigenvector), end_of_training_metrics
                (Figs 2-5, 12-27), bn_mode_jacobian_norms (Theorem A.1), excess_loss,
                weight_norm, jacobian_lipschitz (Lip of the input Jacobian, Fig 4's mechanism).
  runs          Run directories, atomic JSON/torch saving, checkpoints, loading saved runs.
  distributed   torchrun start-up (init_from_env), rank, world_size, is_main, barrier, share of
                the ghost batches, the sums of a data-parallel step (gradients, BN statistics).
  cli           the shared flags, --smoke, one-line errors (exit 2), device, progress bars.
  sweeps        grids of cells, --list-grid / --grid-index, Kendall tau.
  plotting      mean +- std bands, sweep panels, legends under the panels, save_figure.
  figure_check  layout_problems: text beyond the canvas, legends over panels, texts over texts
                (`from common.figure_check import ...`: it loads matplotlib).
"""
from .cli import (ArgumentParser, add_plot_from_flag, check, check_common, check_positive,
                  check_unit_interval, check_width, check_writable, dataset_label, fail,
                  finite_float, gradient_check_or_fail, make_parser, parse_with_smoke, progress,
                  resolve_device, run_main, saved_runs_or_fail, scale_label, smoke_datasets,
                  unpack_plot_from)
from .data import (DATASETS, STANDARDISATIONS, Data, DataError, check_data_file, dataset_path,
                   download_dataset, is_synthetic, load_arrays, load_data, missing_data_message,
                   standardisation_stats, subset_indices, synthetic_arrays, to_images)
from .distributed import (all_reduce_gradients, barrier, init_from_env, is_main, rank, share,
                          shared_bn_statistics, world_size)
from .estimators import (BN_TYPES, DROPOUT_TYPES, ConvergenceWarning, EigenResult, MappingInput,
                         MeasureMode, gauss_newton_norm, gauss_newton_operator, hessian_operator,
                         jacobian_norm, math_attention, no_tf32, sharpness, top_eigenvalues)
from .measurements import (bn_mode_jacobian_norms, eigenvalue_with_convergence,
                           end_of_training_metrics, excess_loss, input_jacobians,
                           jacobian_lipschitz, measurement_batches, output_norm,
                           progressive_sharpening_metrics, realised_curvature,
                           recorded_convergence, step_curvature, weight_norm)
from .models import (ACTIVATIONS, INITS, MLP, MODELS, VGG11, VGG11_CONFIG, BasicBlock, Gaussian,
                     ResNet18, build_model)
from .plotting import (LINESTYLES, labelled_handles, legend_below, log_tick_labels, mean_std,
                       new_figure, plain_ticks, plot_band, plot_runs, plot_step_curvatures,
                       plot_sweep, save_figure, wrapped)
from .runs import (DamagedRun, Run, atomic_write, config_hash, load_json, load_run, load_saved,
                   metric_series, move_aside, pending_runs, restore_training_state, run_name,
                   save_json, save_runs_summary, save_torch, training_state,
                   unpack_runs_summary)
from .sweeps import (add_grid_flags, check_grid_index, grid, kendall_tau, print_grid,
                     selected_cells, sweep_correlations, unique_configs)
from .training import (GradientCheck, augment, cross_entropy, evaluate, ghost_batch_gradient,
                       gradient_check, index_chunks, jacobian_penalty, label_entropy, mixup, sgd,
                       shuffled_batches, train_step)
