"""The JAX DP-SGD trainer."""
