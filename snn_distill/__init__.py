"""snn-distill: distil transformer language models into spiking students."""

__version__ = "0.1.0"
