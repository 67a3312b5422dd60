//! The real parts: containerd, a registry, moto.
