//! CPU kernels: SIMD quantized matrix products and paged attention.

pub mod q4_1;
