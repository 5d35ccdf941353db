"""Native CPU kernels (XLA FFI), built on first use; see build.py."""
