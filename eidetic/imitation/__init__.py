"""Single-example imitation of an image-to-image model (Spingarn & Michaeli, 2024).

Given exactly one (input, output) pair of a black-box image-to-image model (the *teacher*),
train a small *student* network with an L2 loss on random crops of that pair, then measure
how well the student reproduces the teacher on images it has never seen. A fixed
(non-blind) operator with a small receptive field turns one large image into many training
examples, so a student can copy it. A blind teacher -- a deterministic restoration model
that adapts to an unknown degradation of its input, e.g. a denoiser that estimates the
noise level -- is harder: one example shows it at one degradation level only. A teacher
whose output is random is neither; the built-in one is a labelled negative control.

Teachers come in three kinds: degradation operators applied to clean photographs
(``gaussian_blur``, ``unsharp_mask``, ``tv_denoise``, ``bicubic_sr``); restoration
models applied to degraded inputs, the paper's setting (``wavelet_denoise`` at a known
noise level, ``richardson_lucy`` with a known blur, and the blind
``wavelet_denoise_blind``); and ``random_noise_control``.

Conventions (everything in this module):

* Teachers work on numpy arrays ``(H, W, 3)`` float in ``[0, 1]`` — the format of the
  scientific-Python operators they wrap — and return the same layout. A user teacher given
  as ``"module:function"`` must follow the same contract.
* Students and metrics work on torch tensors ``(B, 3, H, W)`` float in ``[0, 1]``
  (PSNR/SSIM with ``data_range=1``).
* Sizes: the teacher's output must have the input's size, or exactly ``s`` times it in both
  dimensions for an integer ``s >= 2`` (super-resolution). In the latter case the student
  runs at input resolution and ends in a pixel-shuffle head with ``3 * s**2`` channels
  (ESPCN-style), added to a nearest-neighbour upsampling of its input; a crop of side ``c``
  in the input is paired with the aligned crop of side ``s * c`` in the output. Anything
  else (different aspect, non-integer scale, fewer pixels) is an :class:`ImitationError`.
"""

from __future__ import annotations

from .crops import RandomCropSampler, check_pair, output_scale
from .evaluation import (
    PASS_PSNR,
    HeldoutPair,
    evaluate_student,
    heldout_pairs,
    image_metrics,
    load_student,
    save_student,
)
from .images import ImitationError, center_crop, load_image, to_numpy, to_tensor
from .students import (
    PlainCNN,
    SmallUNet,
    apply_student,
    build_student,
    identity_prediction,
    receptive_field,
)
from .teachers import (
    BUILTIN_TEACHERS,
    InputDegradation,
    Teacher,
    gaussian_psf,
    build_teacher,
    diffusion_teacher,
    is_deterministic,
    load_callable_teacher,
)

__all__ = [
    "ImitationError",
    "BUILTIN_TEACHERS",
    "Teacher",
    "InputDegradation",
    "gaussian_psf",
    "PASS_PSNR",
    "build_teacher",
    "diffusion_teacher",
    "load_callable_teacher",
    "load_image",
    "center_crop",
    "to_tensor",
    "to_numpy",
    "output_scale",
    "check_pair",
    "RandomCropSampler",
    "PlainCNN",
    "SmallUNet",
    "build_student",
    "receptive_field",
    "apply_student",
    "image_metrics",
    "HeldoutPair",
    "heldout_pairs",
    "evaluate_student",
    "identity_prediction",
    "is_deterministic",
    "save_student",
    "load_student",
]
