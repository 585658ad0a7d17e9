"""Shared code for the reproduction of "On progressive sharpening, flat minima and
generalisation" (MacDonald, Valmadre, Lucey).

Sections, in order:
  1. Estimators: sharpness, Gauss-Newton norm, input-output Jacobian norm and the
     Lanczos / power eigen-solver behind them. Self-contained (imports torch only):
     copy the section whole into your own project.
  2. Data: CIFAR-10/100 as device tensors, standardisation, subsets, synthetic stand-ins.
  3. Models: MLPs, VGG11, ResNet18.
  4. Training: losses, ghost-batch full-batch gradient descent, SGD helpers.
  5. Runs: run directories, atomic saving, checkpoints, resume.
  6. Command line: shared flags and validation (one-line errors, exit status 2).
  7. Plotting: mean +- std bands from saved results.
"""
import math
from dataclasses import dataclass, field

import torch

# =============================================================================
# 1. Estimators
# =============================================================================

# (estimators go here)


# =============================================================================
# 2. Data
# =============================================================================

# (data goes here)


# =============================================================================
# 3. Models
# =============================================================================

# (MLPs go here)


# (VGG11 and ResNet18 go here)


# =============================================================================
# 4. Training
# =============================================================================

# (training goes here)


# =============================================================================
# 5. Runs
# =============================================================================

# (runs go here)


# =============================================================================
# 6. Command line
# =============================================================================

# (command line goes here)


# =============================================================================
# 7. Plotting
# =============================================================================

# (plotting goes here)
