"""Import shim used by benches/gpu_check.sh on machines without bitsandbytes (never installed, never on
sys.path otherwise).

galore-torch and apollo-torch import bitsandbytes at package import for their 8-bit optimizers, which the
benchmarks never build (they time GaLoreAdamW and APOLLOAdamW); peft probes it for quantized layers, which
the benchmarked models do not have. Everything here raises when actually used."""

MESSAGE = "bitsandbytes is not installed (benches/bnb_shim import shim)"

from . import nn, optim  # noqa: E402,F401  (real bitsandbytes exposes both as attributes)
