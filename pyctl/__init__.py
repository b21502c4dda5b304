"""kvmlu control plane."""
