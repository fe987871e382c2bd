"""slimdet: make object detectors small and fast for the hardware they run on."""

__version__ = "0.1.0"
