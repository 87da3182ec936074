//! Dataset streaming for the VQ models: yields `ndarray` batches (u8 or f32, NCHW / NCTHW).
//!
//! This crate never links libtorch; `vq-train` converts its batches to tensors.
